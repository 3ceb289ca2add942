"""/v1/embeddings throughput of an rlserve server beside transformers (AutoModel, last-token pooling,
normalised) on the same prompts and the same architecture with dummy weights.

GPU:  python benchmarks/embeddings.py --model qwen3-0.6b --prompts 2048 --prompt-len 256 --batch 64
CPU smoke check:  python benchmarks/embeddings.py --model tiny-qwen3 --prompts 32 --prompt-len 32 --batch 8
Prints one JSON line per side: prompts/s and prompt tokens/s.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import subprocess
import sys
import time

import httpx
import torch


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def bench_server(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from rlserve.net import free_port
    port = free_port()
    cmd = [sys.executable, "-m", "rlserve.server", "--model", args.model, "--load-format", "dummy",
           "--port", str(port), "--log-level", "warning", *args.server_args]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]

        def post(batch: list[list[int]]) -> int:
            r = httpx.post(url + "/v1/embeddings", json={"input": batch}, timeout=600)
            r.raise_for_status()
            return int(r.json()["usage"]["prompt_tokens"])
        post(batches[0])                                 # warm-up
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            tokens = sum(pool.map(post, batches))
        elapsed = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(60)
    return {"side": "rlserve", "prompts_per_s": len(prompts) / elapsed, "tokens_per_s": tokens / elapsed,
            "elapsed_s": elapsed}


@torch.inference_mode()
def bench_transformers(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from transformers import AutoModel

    from rlserve.models.presets import preset_hf_config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModel.from_config(preset_hf_config(args.model), dtype=dtype).to(device).eval()

    def run(batch: list[list[int]]) -> None:
        h = model(torch.tensor(batch, device=device)).last_hidden_state[:, -1]   # equal lengths: no padding
        torch.nn.functional.normalize(h.float(), dim=-1).cpu()
    run(prompts[:args.batch])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(prompts), args.batch):
        run(prompts[i:i + args.batch])
    elapsed = time.perf_counter() - start
    tokens = sum(map(len, prompts))
    return {"side": "transformers", "prompts_per_s": len(prompts) / elapsed, "tokens_per_s": tokens / elapsed,
            "elapsed_s": elapsed, "device": device, "dtype": str(dtype)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="a preset (dummy weights)")
    p.add_argument("--prompts", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="prompts per request (and per transformers forward)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight against the server")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("server_args", nargs="*", help="extra `rlserve serve` flags (after --)")
    args = p.parse_args()
    from rlserve.models.presets import preset_hf_config
    prompts = _prompts(args.prompts, args.prompt_len, preset_hf_config(args.model).vocab_size)
    print(json.dumps({"model": args.model, **bench_server(args, prompts)}), flush=True)
    if not args.skip_transformers:
        print(json.dumps({"model": args.model, **bench_transformers(args, prompts)}), flush=True)


if __name__ == "__main__":
    main()
