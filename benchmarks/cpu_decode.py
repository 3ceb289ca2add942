"""Batch-1 decode on a CPU, float vs quantized weights, beside transformers in the same run, and where a
step's time goes (torch.profiler): matmuls (GEMV at batch 1), attention, other ops, and the rest of the
wall time (Python, the dispatcher, the engine's bookkeeping).

`python benchmarks/cpu_decode.py --modes float,int8,int4 --tokens 128`
`python benchmarks/cpu_decode.py --modes float,int4 --tokens 128 --concurrent 32 --no-hf` (32 requests of the
same prompt decoding together: output tok/s of the decode phase, the batched-decode figure beside the
prefill-heavy `rlserve bench offline` one)
`python benchmarks/cpu_decode.py --modes int4 --no-hf --elementwise inductor` (torch.compile'd elementwise
chains instead of eager ops: on a 2-core CPU at batch 1 their guards cost more than the ops they fuse)
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from rlserve import LLM, SamplingParams

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
           "aten::linear", "aten::matmul"}
ATTENTION = ("attention", "softmax", "sdpa", "flash")
PROMPT = "The capital of France is Paris. Tell me about the history of the city, its rivers and its bridges."


def decode_tok_s(step: Callable[[], object], steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t)


def rlserve_decode(mode: str, tokens: int, profile_steps: int, concurrent: int = 1,
                   top: int = 0, elementwise: str = "auto") -> tuple[float, dict[str, float]]:
    """Output tok/s over `tokens` decode steps of `concurrent` requests (all prefilled first), and the
    profiled split of `profile_steps` more."""
    method, _, dtype = mode.partition(":")          # e.g. int8:bfloat16 (the model's other layers in bf16)
    llm = LLM(quantization=None if method == "float" else method, dtype=dtype or "auto", compile=elementwise,
              max_total_tokens=max(4096, concurrent * (tokens + profile_steps + 64)))
    e = llm.engine
    ids = e.tokenizer(PROMPT)["input_ids"]
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)   # warm-up
    for _ in range(concurrent):
        e.add_request(ids, SamplingParams(temperature=0, max_tokens=tokens + profile_steps + 10, ignore_eos=True))
    while (s := e.status()).waiting or s.chunked:
        e.step()
    e.step()
    tok_s = concurrent * decode_tok_s(e.step, tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(profile_steps):
            e.step()
        wall = time.perf_counter() - t
    if top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return tok_s, breakdown(prof, wall, profile_steps)


def breakdown(prof: profile, wall: float, steps: int) -> dict[str, float]:
    """ms per step: matmuls, attention, other aten ops (self time, so nothing counts twice), and the rest."""
    out = {"matmul": 0.0, "attention": 0.0, "other ops": 0.0}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        ms = ev.self_cpu_time_total / 1e3 / steps
        if ev.key in MATMULS:
            out["matmul"] += ms
        elif any(a in ev.key for a in ATTENTION):
            out["attention"] += ms
        else:
            out["other ops"] += ms
    out["wall"] = wall * 1e3 / steps
    out["python + dispatch"] = out["wall"] - out["matmul"] - out["attention"] - out["other ops"]
    return out


@torch.no_grad()
def hf_decode(tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlserve.models.default import ensure_default_model

    path = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt")["input_ids"]
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)     # warm-up
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False)
    one = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - one
    return tokens / (one - t - prefill)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="float,int8,int4", help="float|int8|int4, each optionally :dtype")
    ap.add_argument("--tokens", type=int, default=128, help="decode steps timed")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=1,
                    help="requests decoding at once (the same prompt; tok/s counts all of them)")
    ap.add_argument("--top", type=int, default=0, help="also print the profile's N costliest ops")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also llama.cpp on the GGUF the default model comes from (needs rlserve[llamacpp])")
    ap.add_argument("--elementwise", default="auto", help="auto|inductor|eager: how norms, rotary and the "
                    "gated activation run (auto is eager on a CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    # Figures are only comparable on a quiet machine: say how busy it was.
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.2f}")
    if not a.no_hf and a.concurrent == 1:
        print(f"transformers (float32): {hf_decode(a.tokens):.1f} tok/s")
    if a.llama_cpp:
        from llama_cpp_peer import batch1_tok_s, concurrent_tok_s
        print(f"llama.cpp (Q4_1 GGUF): {batch1_tok_s(PROMPT, a.tokens, torch.get_num_threads()):.1f} tok/s")
        if a.concurrent > 1:
            tok_s = concurrent_tok_s(PROMPT, a.concurrent, a.tokens, torch.get_num_threads())
            print(f"llama.cpp (Q4_1 GGUF) x{a.concurrent}, 24-token prompts: {tok_s:.1f} tok/s")
    for mode in a.modes.split(","):
        tok_s, parts = rlserve_decode(mode, a.tokens, a.profile_steps, a.concurrent, a.top, a.elementwise)
        split = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
        print(f"rlserve {mode} x{a.concurrent}: {tok_s:.1f} tok/s; profiled ms/step: {split}")


if __name__ == "__main__":
    main()
