"""A serving run's requests spread over several client processes.

One asyncio process parses every streamed chunk of every request; at tens of thousands of streamed
tokens a second that takes most of a core, and a busy client stamps chunks late (bursts of tokens read
together look like near-zero inter-token gaps). Here request i goes to process i mod N, keeps its place
in the run's one Poisson schedule, and all processes start on the same wall-clock instant. A
--max-concurrency cap is split between the processes (shares differ by at most one), so each process
caps its own requests: the same load as one shared cap when requests are alike.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from rlserve.bench.serving_client import RequestResult, RunConfig, RunOutcome, make_client, run_requests
from rlserve.bench.serving_workload import BenchRequest, arrival_times

START_DELAY_S = 0.5      # from the last process's readiness to the common start


def shards(n_items: int, n: int) -> list[list[int]]:
    """Indices of the items each of n processes sends, round robin."""
    return [list(range(i, n_items, n)) for i in range(n)]


def concurrency_shares(total: int | None, n: int) -> list[int | None]:
    if total is None:
        return [None] * n
    if total < n:
        raise ValueError(f"--max-concurrency {total} can't be split over {n} client processes")
    return [total // n + (i < total % n) for i in range(n)]


def _ready(_: int) -> float:
    time.sleep(0.05)     # long enough that each idle process takes one of these, not one process all
    return time.time()


async def _send_shard(cfg: RunConfig, requests: list[BenchRequest], offsets: list[float], start_at: float
                      ) -> tuple[list[RequestResult], float, float]:
    await asyncio.sleep(max(start_at - time.time(), 0.0))
    async with make_client(cfg) as client:
        run = await run_requests(client, requests, cfg, offsets)
    return run.results, time.time(), run.client_cpu_s


def _run_shard(cfg: RunConfig, requests: list[BenchRequest], offsets: list[float], start_at: float
               ) -> tuple[list[RequestResult], float, float]:
    return asyncio.run(_send_shard(cfg, requests, offsets, start_at))


def run_in_processes(requests: list[BenchRequest], cfg: RunConfig, processes: int) -> RunOutcome:
    """Send `requests` from `processes` client processes; results in request order. The duration runs from
    the common start to the last finish; client_cpu_s is the busiest process's CPU time."""
    offsets = arrival_times(len(requests), cfg.request_rate, cfg.seed)
    parts = [p for p in shards(len(requests), processes) if p]
    caps = concurrency_shares(cfg.max_concurrency, len(parts))
    ctx = multiprocessing.get_context("spawn")      # no forked copy of the caller's threads or CUDA state
    with ProcessPoolExecutor(len(parts), mp_context=ctx) as pool:
        # Start every process (spawning and importing take ~1 s) before fixing the common start.
        ready = max(pool.map(_ready, range(len(parts))))
        start_at = max(ready, time.time()) + START_DELAY_S
        futures = [pool.submit(_run_shard, replace(cfg, max_concurrency=cap, progress=False),
                               [requests[i] for i in part], [offsets[i] for i in part],
                               start_at)
                   for part, cap in zip(parts, caps)]
        done = [f.result() for f in futures]
    slots: list[RequestResult | None] = [None] * len(requests)
    for part, (res, _, _) in zip(parts, done):
        for i, r in zip(part, res):
            slots[i] = r
    results = [r for r in slots if r is not None]     # every index is in one part
    duration = max(end for _, end, _ in done) - start_at
    return RunOutcome(results, duration, max(cpu for _, _, cpu in done))
