"""Where prefill's time goes: the offline workload's prompts with one output token each, wall time per
step, then torch.profiler's device kernels over one more round.

    python benchmarks/profile_prefill.py --model qwen3-0.6b [--kv-cache-dtype fp8_e4m3] [--trace]

A round prefills every prompt from an empty prefix cache; the first (shorter) round compiles and
autotunes, so it is not reported.
"""
from __future__ import annotations

import argparse
import time

import torch

from rlserve import LLM, SamplingParams
from rlserve.bench.offline import sync_device
from rlserve.bench.workload import make_workload


def prefill_round(llm: LLM, prompts: list[list[int]]) -> list[float]:
    """Prefill `prompts` (max_tokens=1) from an empty prefix cache; the wall time of each engine step."""
    engine = llm.engine
    engine.flush_cache()
    for ids in prompts:
        engine.add_request(ids, SamplingParams(temperature=0.6, max_tokens=1, ignore_eos=True))
    steps: list[float] = []
    sync_device(engine.device)
    last = time.perf_counter()
    while engine.has_unfinished():
        engine.step(emit_unfinished=False)
        now = time.perf_counter()
        steps.append(now - last)
        last = now
    sync_device(engine.device)
    steps[-1] += time.perf_counter() - last
    return steps


def main(argv: list[str] | None = None) -> list[list[float]]:
    """Returns each reported round's step times (s)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--kv-cache-dtype", default="auto", help='"auto" or "fp8_e4m3"')
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-input", type=int, default=1024, help="prompt lengths are uniform in [min(100, this), this]")
    ap.add_argument("--vocab", type=int, default=10000, help="prompt token ids are drawn from [0, vocab]")
    ap.add_argument("--chunked-prefill-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trace", action="store_true", help="print torch.profiler's kernel table of one more round")
    a = ap.parse_args(argv)
    llm = LLM(a.model, load_format=a.load_format, kv_cache_dtype=a.kv_cache_dtype, device=a.device,
              chunked_prefill_size=a.chunked_prefill_size)
    prompts = make_workload(num_prompts=a.num_prompts, min_input=min(100, a.max_input), max_input=a.max_input,
                            max_token_id=a.vocab).prompt_token_ids
    tokens = sum(len(p) for p in prompts)
    prefill_round(llm, prompts[:32])
    rounds = []
    for r in range(a.rounds):
        steps = prefill_round(llm, prompts)
        rounds.append(steps)
        total = sum(steps)
        print(f"round {r}: {tokens:,} prompt tokens in {len(steps)} steps, {total:.3f} s "
              f"({tokens / total:,.0f} tok/s); ms a step: {' '.join(f'{s * 1e3:.1f}' for s in steps)}", flush=True)
    if a.trace:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            prefill_round(llm, prompts)
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60))
    print(f"kv leaked: {llm.engine.kv_leaked()}")
    return rounds


if __name__ == "__main__":
    main()
