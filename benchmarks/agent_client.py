"""What an agentic rollout costs the trainer's process itself: N multi-turn samples against a stand-in
/generate server that answers at once (a first turn writing a ```python block, a second giving the
answer), so the wall time and CPU left are the client's: HTTP, rendering tool results, running the
sandbox. The stand-in runs in its own process; the sandbox's children run on the machine's other cores.

    python benchmarks/agent_client.py --samples 128 [--samples-per-pool 128] [--profile 25] [--rollout-process]

Per repeat: wall time, this process's CPU time, turns. `--rollout-process` draws as
`asynchronous.rollout_process` does (rl/draw_process.py: the same drawer in a child process, groups of the
config's group_size), so this process's CPU is what a trainer keeps: sending the request and loading the
answered groups. `--samples-per-pool N` sets how many samples share
one HTTP connection pool (the backend's SAMPLES_PER_POOL); `--profile K` prints the K costliest calls of
the last repeat (cProfile)."""
from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import pstats
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

FIRST = "Let me compute it.\n```python\nprint(123 * 456)\n```\n"
SECOND = "The answer is \\boxed{56088}."


def _serve(port: int, tokenizer_dir: str) -> None:
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    first = tok.encode(FIRST, add_special_tokens=False)
    second = tok.encode(SECOND, add_special_tokens=False) + [tok.eos_token_id]
    marker = tok.encode("56088", add_special_tokens=False)      # in the tool's answer: the second turn
    app = FastAPI()

    def has(seq: list[int], sub: list[int]) -> bool:
        return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

    @app.post("/generate")
    async def generate(body: dict[str, Any]) -> dict[str, Any]:
        out = second if has(body["input_ids"], marker) else first
        return {"text": tok.decode(out), "output_ids": out,
                "meta_info": {"output_token_logprobs": [[-0.1, t, None] for t in out], "weight_version": "0",
                              "finish_reason": {"type": "stop"}}}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {}
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _no_reward(*_: Any, **__: Any) -> float:
    return 0.0


def main(argv: list[str] | None = None) -> int:
    import httpx
    from transformers import AutoTokenizer

    from rlserve.models.default import ensure_default_model
    from rlserve.net import free_port
    from rlserve.rl.agent import backend as agent_backend
    from rlserve.rl.agent.rollout import run_agent
    from rlserve.rl.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--samples-per-pool", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory with a chat template (default: "
                   "the default model's)")
    p.add_argument("--profile", type=int, default=0)
    p.add_argument("--rollout-process", action="store_true", help="draw in a child process, as "
                   "asynchronous.rollout_process does")
    args = p.parse_args(argv)
    if args.samples_per_pool:
        agent_backend.SAMPLES_PER_POOL = args.samples_per_pool
    tokenizer_dir = args.tokenizer or str(ensure_default_model())
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, tokenizer_dir), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or not server.is_alive():
                    raise RuntimeError("the stand-in server did not start") from None
                time.sleep(0.2)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "agent_calculator.yaml")
        text = tok.apply_chat_template([{"role": "user", "content": "What is 123 * 456?"}],
                                       add_generation_prompt=True, tokenize=False)
        prompt = tok.encode(text, add_special_tokens=False)
        llm = SimpleNamespace(engine=SimpleNamespace(tokenizer=tok))
        n = args.samples
        print(f"{n} samples of examples/agent_calculator.yaml, two turns and one sandbox call each; samples per pool: "
              f"{agent_backend.SAMPLES_PER_POOL}")
        prof = None
        drawer = None
        if args.rollout_process:
            from rlserve.rl.draw_process import DrawerSpec, ProcessDrawer
            spec = DrawerSpec(cfg.rollout, [f"http://127.0.0.1:{port}"], None, None, _no_reward, tok)
            drawer = ProcessDrawer(None, spec)  # type: ignore[arg-type]  # draws only
            groups = -(-n // cfg.rollout.group_size)
            n = groups * cfg.rollout.group_size
        for rep in range(args.repeat):
            if args.profile and rep == args.repeat - 1:
                prof = cProfile.Profile()
                prof.enable()
            cpu, wall = time.process_time(), time.perf_counter()
            if drawer is not None:
                drawn = drawer.draw([(list(prompt), {})] * groups, rep, 0)
                samples = [s for g in drawn for s in g.samples]
            else:
                samples = run_agent(llm, cfg.rollout, [list(prompt)] * n, [{}] * n,  # type: ignore[arg-type]
                                    _no_reward, list(range(n)), 0.7,
                                    backend=agent_backend.ServerBackend([f"http://127.0.0.1:{port}"]), tokenizer=tok)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if prof is not None:
                prof.disable()
            done = sum(s.status == "finished" and s.tool_calls == 1 for s in samples)
            print(f"repeat {rep}: wall {wall:.2f} s, this process's CPU {cpu:.2f} s, "
                  f"{sum(s.turns for s in samples)} turns, {done}/{n} finished{' (profiled)' if prof else ''}")
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
        if drawer is not None:
            drawer.close()
    finally:
        server.terminate()
        server.join(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
