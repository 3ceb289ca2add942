"""Per-worker load and cache hit rate in one place: the router's Prometheus metrics (requests it sent
to each worker, each worker's health) joined with each worker's own /metrics (requests finished, prompt
and cached tokens, running and waiting requests). The router counts requests per worker only through its
circuit breaker (`smg_worker_cb_outcomes_total{worker, outcome}`) and knows nothing of the workers'
prefix caches, hence the join."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 10.0
ROUTER_OUTCOMES = "smg_worker_cb_outcomes"     # counter: requests per worker and outcome (success/failure)
ROUTER_HEALTH = "smg_worker_health"            # gauge: 1 healthy, 0 not
# the worker's counters (rlserve/server/metrics.py), summed over their labels
WORKER_SERIES = {"requests": "rlserve_requests_total", "prompt_tokens": "rlserve_prompt_tokens_total",
                 "cached_tokens": "rlserve_cached_tokens_total", "running": "rlserve_num_requests_running",
                 "waiting": "rlserve_num_requests_waiting", "kv_cache_usage": "rlserve_kv_cache_usage_ratio"}


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text page: (name, labels, value)."""
    r = httpx.get(url, timeout=SCRAPE_TIMEOUT_S)
    r.raise_for_status()
    return [(s.name, dict(s.labels), float(s.value))
            for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def router_per_worker(metrics_url: str) -> dict[str, dict[str, float]]:
    """{worker url: {"routed_ok", "routed_failed", "healthy"}} from the router's metrics."""
    out: dict[str, dict[str, float]] = {}
    for name, labels, value in scrape(metrics_url):
        worker = labels.get("worker")
        if worker is None:
            continue
        row = out.setdefault(worker, {"routed_ok": 0.0, "routed_failed": 0.0, "healthy": 0.0})
        if name == ROUTER_OUTCOMES + "_total":
            row["routed_ok" if labels.get("outcome") == "success" else "routed_failed"] += value
        elif name == ROUTER_HEALTH:
            row["healthy"] = value
    return out


def worker_stats(url: str) -> dict[str, float]:
    """A worker's own counters from its /metrics, and its prefix-cache hit rate (cached / prompt tokens)."""
    samples = scrape(url.rstrip("/") + "/metrics")
    row = {key: sum(v for n, _, v in samples if n == series) for key, series in WORKER_SERIES.items()}
    row["cache_hit_rate"] = row["cached_tokens"] / row["prompt_tokens"] if row["prompt_tokens"] else 0.0
    return row


def summary(metrics_url: str, worker_urls: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{worker url: the router's view (routed_ok, routed_failed, healthy) + the worker's own stats}; a
    worker that does not answer has `error` instead of its stats."""
    routed = router_per_worker(metrics_url)
    out: dict[str, dict[str, Any]] = {}
    for url in worker_urls:
        row: dict[str, Any] = dict(routed.get(url, {"routed_ok": 0.0, "routed_failed": 0.0, "healthy": 0.0}))
        try:
            row.update(worker_stats(url))
        except (httpx.HTTPError, OSError) as e:
            row["error"] = str(e)
        out[url] = row
    return out
