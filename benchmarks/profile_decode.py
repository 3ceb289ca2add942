"""Where a decode step's time goes: wall time per step with the engine's settings, and the top device
kernels from torch.profiler. `python benchmarks/profile_decode.py --model qwen3-0.6b`."""
from __future__ import annotations

import argparse
import random
import time
from contextlib import nullcontext

import torch

from rlserve import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto", help='"auto" or "fp8_e4m3"')
    a = ap.parse_args()
    llm = LLM(a.model, cuda_graph=not a.no_cuda_graph, overlap_schedule="off" if a.no_overlap else "auto",
              compile="eager" if a.no_compile else "auto", kv_cache_dtype=a.kv_cache_dtype)
    e = llm.engine
    rng = random.Random(0)
    for _ in range(a.batch):
        e.add_request([rng.randint(0, 10000) for _ in range(a.context)],
                      SamplingParams(temperature=0.6, max_tokens=a.steps + 30, ignore_eos=True))
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    t = time.perf_counter()
    prefill_steps = 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if a.trace else nullcontext() as prof:
        while (s := e.status()).waiting or s.chunked:
            e.step()
            prefill_steps += 1
        torch.cuda.synchronize()
    print(f"prefill of {a.batch} x {a.context} tokens: {prefill_steps} steps, {time.perf_counter() - t:.3f} s")
    if a.trace:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    for _ in range(5):
        e.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        e.step()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t) / a.steps
    print(f"batch {a.batch}, context ~{a.context}: {per_step * 1e3:.2f} ms/step, "
          f"{a.batch / per_step:,.0f} tok/s (graph={not a.no_cuda_graph}, overlap={not a.no_overlap}, compile={not a.no_compile})")
    if a.trace:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                e.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    while e.has_unfinished():     # the rest of the requests' tokens, untimed
        e.step(emit_unfinished=False)


if __name__ == "__main__":
    main()
