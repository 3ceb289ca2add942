"""Prometheus metrics: counters and histograms fed by the front end, gauges read from the engine."""
from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from rlserve.server import ipc

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class TokenGapHistogram:
    """The inter-token latency histogram in plain counters, exported by a collector. It is observed for
    every streamed token, where prometheus_client's Histogram.observe (a lock and a value object per
    bucket) costs a few µs each; this takes one bisect and two additions, for any number of tokens."""

    name = "rlserve_inter_token_latency_seconds"

    def __init__(self, model_name: str, buckets: tuple[float, ...]) -> None:
        self.model_name = model_name
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)           # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += times   # a bucket counts values <= its bound
        self.sum += seconds * times

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, "Time between output tokens", labels=["model_name"])
        total, buckets = 0, []
        for bound, n in zip([*self.bounds, math.inf], self.counts):
            total += n
            buckets.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]  # untyped library helper
        family.add_metric([self.model_name], buckets, self.sum)
        yield family


def kv_split(info: dict[str, Any]) -> dict[str, float]:
    """The KV pool's slots held by running requests, and those only the prefix cache holds (reclaimable
    on demand, so not load), as fractions of the pool, from the engine's info query."""
    total = info.get("kv_total", 0)
    if not total:
        return {"kv_used_ratio": 0.0, "kv_cached_ratio": 0.0}
    cached = info.get("tree_evictable_tokens", 0)
    used = max(total - info.get("kv_available", total) - cached, 0)
    return {"kv_used_ratio": used / total, "kv_cached_ratio": cached / total}


class Metrics:
    def __init__(self, model_name: str) -> None:
        # One registry per server keeps several servers in one process (tests) apart.
        self.registry = r = CollectorRegistry()
        lbl = ["model_name"]
        self.model_name = model_name
        self.requests = Counter("rlserve_requests", "Finished requests by finish reason", lbl + ["finish_reason"],
                                registry=r)
        self.http_errors = Counter("rlserve_request_errors", "Requests refused or failed, by HTTP status",
                                   lbl + ["status"], registry=r)
        self.prompt_tokens = Counter("rlserve_prompt_tokens", "Prompt tokens of finished requests", lbl, registry=r)
        self.generation_tokens = Counter("rlserve_generation_tokens", "Generated tokens", lbl, registry=r)
        self.cached_tokens = Counter("rlserve_cached_tokens", "Prompt tokens served from the prefix cache", lbl,
                                     registry=r)
        self.running = Gauge("rlserve_num_requests_running", "Requests running in the engine", lbl, registry=r)
        self.waiting = Gauge("rlserve_num_requests_waiting", "Requests waiting in the engine", lbl, registry=r)
        self.kv_usage = Gauge("rlserve_kv_cache_usage_ratio",
                              "Fraction of KV pool slots held by running requests", lbl, registry=r)
        self.kv_cached = Gauge("rlserve_kv_cache_cached_ratio",
                               "Fraction of KV pool slots held only by the prefix cache (evictable)", lbl, registry=r)
        self.hit_rate = Gauge("rlserve_prefix_cache_hit_rate", "Cached prompt tokens / prompt tokens", lbl,
                              registry=r)
        self.ttft = Histogram("rlserve_time_to_first_token_seconds", "Time to first token", lbl,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = TokenGapHistogram(model_name, _LATENCY_BUCKETS)
        r.register(self.itl)
        self.e2e = Histogram("rlserve_e2e_request_latency_seconds", "End-to-end request latency", lbl,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._timing: dict[str, tuple[float, float | None]] = {}   # rid → (start, last token time)
        # The per-token series, looked up once: labels() costs a lock and a dict lookup per call,
        # several µs a streamed token.
        self._generation_tokens = self.generation_tokens.labels(model_name)
        self._ttft = self.ttft.labels(model_name)

    def start(self, rid: str) -> None:
        self._timing[rid] = (time.monotonic(), None)

    def on_update(self, rid: str, u: ipc.Update) -> None:
        now = time.monotonic()
        start, last = self._timing.get(rid, (now, None))
        new = sum(len(d.token_ids) for d in u.seqs)
        if new:
            self._generation_tokens.inc(new)
            if last is None:
                self._ttft.observe(now - start)
            else:
                self.itl.observe((now - last) / new, new)
            last = now
        self._timing[rid] = (start, last)
        if u.finished:
            m = self.model_name
            self._timing.pop(rid, None)
            self.e2e.labels(m).observe(now - start)
            self.prompt_tokens.labels(m).inc(u.prompt_tokens)
            self.cached_tokens.labels(m).inc(u.cached_tokens)
            for d in u.seqs:
                self.requests.labels(m, d.finish_reason or "unknown").inc()

    def forget(self, rid: str) -> None:
        """The request is done with; if it never finished (the client left, or it failed), count it
        as aborted."""
        if self._timing.pop(rid, None) is not None:
            self.requests.labels(self.model_name, "abort").inc()

    def error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def set_engine(self, info: dict[str, Any]) -> None:
        m = self.model_name
        self.running.labels(m).set(info.get("num_running", 0))
        self.waiting.labels(m).set(info.get("num_waiting", 0))
        split = kv_split(info)
        self.kv_usage.labels(m).set(split["kv_used_ratio"])
        self.kv_cached.labels(m).set(split["kv_cached_ratio"])
        stats = info.get("stats", {})
        prompt = stats.get("prompt_tokens", 0) + stats.get("cached_tokens", 0)
        self.hit_rate.labels(m).set(stats.get("cached_tokens", 0) / prompt if prompt else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
