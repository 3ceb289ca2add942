"""Where an offline run's time goes, step by step, beside the roofline of each step.

    python benchmarks/timeline.py --model qwen3-0.6b [--profile-host FILE]

Drives the engine over `bench offline`'s workload one `Engine.step()` at a time and records each step's
wall time (no device syncs: with overlapped scheduling a step's wall time is the pipeline's pace), its
kind and its batch size. Decode steps are grouped by batch size; each group is printed with its
measured time and its roofline time (`roofline.step_roofline_s`, the step cost the offline roofline
sums), so the gap to the roofline can be pinned on a phase: prefill, large batches, or the small-batch
tail.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from dataclasses import dataclass

import torch

from rlserve.bench.roofline import count_params, device_peaks, step_roofline_s
from rlserve.bench.workload import make_workload
from rlserve.kv_pool import KVPool
from rlserve.llm import LLM
from rlserve.sampling import SamplingParams

BUCKETS = [(193, 256), (129, 192), (65, 128), (33, 64), (17, 32), (1, 16)]


@dataclass
class StepRecord:
    seconds: float
    decode: bool
    batch: int
    context_tokens: int       # KV tokens the step reads


def run(llm: LLM, num_prompts: int) -> tuple[list[StepRecord], float]:
    w = make_workload(num_prompts=num_prompts)
    e = llm.engine
    for ids, n in zip(w.prompt_token_ids, w.max_tokens):
        e.add_request(ids, SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True))
    records = []
    start = last = time.perf_counter()
    while e.has_unfinished():
        s = e.status()
        decode = not s.waiting and not s.chunked
        # KV slots the running requests hold: their contexts, plus the few slots reserved for their
        # next tokens (under 2% of the context at the workload's lengths).
        context = s.kv_total - s.kv_free - s.kv_evictable
        e.step(emit_unfinished=False)
        now = time.perf_counter()
        records.append(StepRecord(now - last, decode, s.running, context))
        last = now
    if e.device.type == "cuda":
        torch.cuda.synchronize()
    return records, time.perf_counter() - start


def summarise(llm: LLM, records: list[StepRecord], total_s: float) -> str:
    cfg = llm.engine.model_config
    dtype = llm.engine.dtype
    streamed = count_params(cfg)[1]
    weight_bytes = streamed * torch.empty((), dtype=dtype).element_size()
    kv_bytes = KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    bw, flops = device_peaks(llm.engine.device) or (float("nan"), float("nan"))
    lines = [f"total {total_s:.2f} s, {len(records)} steps"]
    pre = [r for r in records if not r.decode]
    lines.append(f"prefill/mixed steps: {len(pre)}, {sum(r.seconds for r in pre):.2f} s")
    lines.append(f"{'batch':>9} {'steps':>6} {'seconds':>8} {'ms/step':>8} {'roofline ms':>12} {'fraction':>9}")
    for lo, hi in BUCKETS:
        rs = [r for r in records if r.decode and lo <= r.batch <= hi]
        if not rs:
            continue
        sec = sum(r.seconds for r in rs)
        roof = sum(step_roofline_s(weight_bytes, r.context_tokens, kv_bytes, r.batch, streamed, bw, flops)
                   for r in rs)
        lines.append(f"{lo:>4}-{hi:<4} {len(rs):>6} {sec:>8.2f} {sec / len(rs) * 1e3:>8.2f} "
                     f"{roof / len(rs) * 1e3:>12.2f} {roof / sec:>9.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[StepRecord]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--profile-host", default=None, help="write cProfile stats here and print the top")
    ap.add_argument("--kv-dtype", default=None)
    ap.add_argument("--show-steps", type=int, default=0, help="also print the first N steps one by one")
    ap.add_argument("--warmup-prompts", type=int, default=16)
    a = ap.parse_args(argv)
    kwargs = {"kv_cache_dtype": a.kv_dtype} if a.kv_dtype else {}
    llm = LLM(a.model, **kwargs)
    run(llm, a.warmup_prompts)                     # warm-up: compile, autotune, allocator
    prof = cProfile.Profile() if a.profile_host else None
    if prof:
        prof.enable()
    records, total = run(llm, a.num_prompts)
    if prof:
        prof.disable()
        prof.dump_stats(a.profile_host)
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    for i, r in enumerate(records[:a.show_steps]):
        print(f"step {i}: {r.seconds * 1e3:.1f} ms, {'decode' if r.decode else 'prefill'}, batch {r.batch}")
    print(summarise(llm, records, total))
    if llm.engine.device.type == "cuda":
        # cudaFree (and an allocation retried after freeing the cache) waits for the device: a step that
        # hits one loses its overlap with the host.
        m = torch.cuda.memory_stats()
        print(f"allocator: {m.get('num_device_alloc', 0)} device allocations, {m.get('num_device_free', 0)} "
              f"frees, {m.get('num_alloc_retries', 0)} retries")
    print(f"kv leaked: {llm.engine.kv_leaked()}")
    return records


if __name__ == "__main__":
    main()
