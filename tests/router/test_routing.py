"""Where the router sends requests: a shared prefix stays on the worker that caches it; past the load
thresholds, cache_aware balances instead."""
from __future__ import annotations

import threading

import httpx
from conftest import flush_all, served_tokens, server_info, wait_for

# Long shared prefixes (the router's tree is over characters; the worker's cache over tokens).
GROUPS = [f"Group {g}: " + " ".join(f"{w}{g}" for w in ("alpha", "beta", "gamma", "delta", "omega") * 12)
          for g in range(3)]


def _generate(url: str, text: str, max_new_tokens: int = 2) -> httpx.Response:
    return httpx.post(url + "/generate", json={"text": text, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0.0}}, timeout=300)


def _which_worker(urls: list[str], router: str, text: str) -> str:
    """Send one request through the router; the worker whose prompt-token count moved took it."""
    before = {u: served_tokens(u) for u in urls}
    assert _generate(router, text).status_code == 200
    moved = [u for u in urls if served_tokens(u) != before[u]]
    assert len(moved) == 1, moved
    return moved[0]


def test_shared_prefix_lands_on_one_worker(dp, router_factory):
    router = router_factory(policy="cache_aware")
    urls = dp.worker_urls
    flush_all(urls)
    cached_before = {u: server_info(u)["stats"]["cached_tokens"] for u in urls}
    placed: dict[int, set[str]] = {g: set() for g in range(len(GROUPS))}
    for round_ in range(3):
        for g, prefix in enumerate(GROUPS):
            placed[g].add(_which_worker(urls, router.url, f"{prefix} question {round_}"))
    assert all(len(workers) == 1 for workers in placed.values()), placed
    # the worker that holds a group served the later requests' prefixes from its cache
    for workers in placed.values():
        (u,) = workers
        assert server_info(u)["stats"]["cached_tokens"] > cached_before[u]


def test_round_robin_spreads_one_prefix(dp, router_factory):
    """The contrast: without cache awareness the same prefix visits every worker."""
    router = router_factory(policy="round_robin")
    urls = dp.worker_urls
    seen = {_which_worker(urls, router.url, f"{GROUPS[0]} rr {i}") for i in range(len(urls))}
    assert seen == set(urls)


def _in_flight(urls: list[str]) -> dict[str, int]:
    return {u: server_info(u)["num_requests"] for u in urls}


def _concurrent_long(router: str, text: str, n: int, urls: list[str]) -> dict[str, int]:
    """n requests of one prefix at once; how many each worker holds while all are in flight. The workers
    are paused first, so every request stays in flight until all have arrived however slowly the
    machine sends them (a tiny model finishes a long request in well under a second)."""
    for u in urls:
        assert httpx.post(u + "/pause_generation", json={"mode": "in_place"}, timeout=30).status_code == 200
    threads = [threading.Thread(target=_generate, args=(router, f"{text} {i}", 64)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: sum(_in_flight(urls).values()) == n, f"{n} requests in flight")
        return _in_flight(urls)
    finally:
        for u in urls:
            httpx.post(u + "/abort_request", json={"abort_all": True}, timeout=30)
            httpx.post(u + "/continue_generation", timeout=30)
        for t in threads:
            t.join()


def test_balance_thresholds(dp, router_factory):
    urls = dp.worker_urls
    # default thresholds (64 requests apart): four concurrent requests of one prefix stay together
    sticky = router_factory(policy="cache_aware")
    flush_all(urls)
    spread = _concurrent_long(sticky.url, GROUPS[1] + " sticky", 4, urls)
    assert sorted(spread.values()) == [0, 0, 4], spread
    # thresholds at zero: any imbalance sends the next request to the least loaded worker
    eager = router_factory(policy="cache_aware", balance_abs_threshold=0, balance_rel_threshold=1.0001)
    flush_all(urls)
    spread = _concurrent_long(eager.url, GROUPS[2] + " eager", 4, urls)
    assert max(spread.values()) < 4 and sum(v > 0 for v in spread.values()) >= 2, spread
