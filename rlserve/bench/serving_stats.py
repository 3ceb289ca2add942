"""A serving run's figures: percentiles, the summary over completed requests, and its printed report."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rlserve.bench.serving_client import RequestResult
from rlserve.bench.serving_workload import BenchRequest

CLIENT_BUSY_WARN = 0.8


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Mean, median and p99 of a list of durations, in milliseconds."""
    mean_ms: float
    median_ms: float
    p99_ms: float
    count: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = [s * 1000 for s in seconds]
        mean = sum(ms) / len(ms) if ms else math.nan
        return cls(mean, percentile(ms, 50), percentile(ms, 99), len(ms))



@dataclass(frozen=True)
class Summary:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    requested_output_tokens: int       # over completed requests; equals total_output_tokens when honoured
    cached_tokens: int
    ttft: Stats
    itl: Stats
    e2e: Stats
    tpot: Stats
    errors: list[str]                  # the first few distinct failure messages
    client_cpu_util: float = 0.0       # the client's CPU seconds per wall second; near 1 it skews the timings


def summarize(requests: list[BenchRequest], results: list[RequestResult], duration_s: float,
              client_cpu_s: float = 0.0) -> Summary:
    done = [(q, r) for q, r in zip(requests, results) if r.ok]
    ok = [r for _, r in done]
    inp = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)
    errors = list(dict.fromkeys(r.error for r in results if not r.ok))[:5]
    return Summary(
        completed=len(ok), failed=len(results) - len(ok), duration_s=duration_s,
        request_throughput=len(ok) / duration_s, input_throughput=inp / duration_s,
        output_throughput=out / duration_s, total_input_tokens=inp, total_output_tokens=out,
        requested_output_tokens=sum(q.output_len for q, _ in done), cached_tokens=sum(r.cached_tokens for r in ok),
        ttft=Stats.of([r.ttft for r in ok]), itl=Stats.of([x for r in ok for x in r.itl]),
        e2e=Stats.of([r.e2e for r in ok]),
        tpot=Stats.of([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        errors=errors, client_cpu_util=client_cpu_s / duration_s)


def report(s: Summary, title: str) -> str:
    lines = [f"==== {title} ====",
             f"{'completed requests':<28}{s.completed}",
             f"{'failed requests':<28}{s.failed}",
             f"{'duration (s)':<28}{s.duration_s:.2f}",
             f"{'input tokens':<28}{s.total_input_tokens:,} ({s.cached_tokens:,} cached)",
             f"{'output tokens':<28}{s.total_output_tokens:,} (requested {s.requested_output_tokens:,})",
             f"{'request/s':<28}{s.request_throughput:.2f}",
             f"{'input tok/s':<28}{s.input_throughput:,.1f}",
             f"{'output tok/s':<28}{s.output_throughput:,.1f}",
             f"{'':<28}{'mean':>10}{'median':>10}{'p99':>10}  (ms)"]
    for name, st in (("TTFT", s.ttft), ("ITL", s.itl), ("TPOT", s.tpot), ("E2E", s.e2e)):
        lines.append(f"{name:<28}{st.mean_ms:>10.2f}{st.median_ms:>10.2f}{st.p99_ms:>10.2f}")
    lines.append(f"{'client CPU busy':<28}{s.client_cpu_util:.0%}")
    if s.client_cpu_util > CLIENT_BUSY_WARN:
        lines.append("warning: the client was busy most of the run; its timestamps lag (fewer streams or a "
                     "faster machine for the client)")
    lines += [f"error: {e}" for e in s.errors]
    return "\n".join(lines)
