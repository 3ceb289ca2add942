"""Rollout-shaped generation, seeded (as `rlserve.rl.rollout` samples) against unseeded, same process.

    python benchmarks/rollout_sampling.py [--model qwen3-0.6b] [--prompts 64] [--n 8] [--max-tokens 256]

Prompts are random ids; every completion runs to max_tokens (ignore_eos) at temperature 1 with
tempered logprobs, so both sides sample exactly the same number of tokens.
"""
from __future__ import annotations

import argparse
import random
import time

from rlserve import LLM, SamplingParams


def params(prompts: int, n: int, max_tokens: int, seeded: bool) -> list[SamplingParams]:
    return [SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0,
                           logprobs_mode="tempered", seed=1000 + n * i if seeded else None)
            for i in range(prompts)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prompt-vocab", type=int, default=10000, help="prompt ids are drawn from [0, N)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="timed runs of each side, alternating")
    a = ap.parse_args(argv)
    llm = LLM(a.model, load_format=a.load_format, dtype=a.dtype)
    rng = random.Random(0)
    prompts = [[rng.randrange(a.prompt_vocab) for _ in range(a.prompt_len)] for _ in range(a.prompts)]
    llm.generate(prompts, params(a.prompts, a.n, 16, True), use_tqdm=False)      # warm up
    for _ in range(a.rounds):
        for seeded in (True, False):
            llm.engine.flush_cache()
            start = time.perf_counter()
            outs = llm.generate(prompts, params(a.prompts, a.n, a.max_tokens, seeded), use_tqdm=False)
            took = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
            print(f"seeded={seeded}: {tokens} tokens in {took:.2f} s = {tokens / took:,.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
