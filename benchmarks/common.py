"""What several benchmark scripts share: CUDA timing and overriding a kernel module's choice for a sweep.

A script run as `python benchmarks/<name>.py` has benchmarks/ on sys.path, not the repository root;
the scripts that import this module first put the root there (see their `sys.path` lines).
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch


def time_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 20, inner: int = 10) -> float:
    """Median over `reps` CUDA-event timings of `inner` back-to-back calls, per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def graph_time_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """Per-call time of `calls` captured back to back and replayed: kernel time without launch gaps."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, warmup=3, reps=10, inner=1) / calls


@contextmanager
def overriding(module: ModuleType, name: str, value: Any) -> Iterator[None]:
    """`module.name` is `value` inside the block (a kernel's launch config or split count, for a sweep);
    the kernels look these up at each launch, so the product code carries no override parameters."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)
