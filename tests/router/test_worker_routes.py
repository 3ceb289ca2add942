"""The routes sglang-router calls on an rlserve worker, and the launcher's pure helpers."""
from __future__ import annotations

import httpx

from rlserve.router.config import RouterConfig, router_flags
from rlserve.router.dp import WorkerSpec, memory_fractions, start_rounds
from rlserve.server.worker_routes import load_entry


def test_get_load_is_sglangs_per_rank_list(dp):
    load = httpx.get(dp.worker_urls[0] + "/get_load", timeout=30).json()
    assert isinstance(load, list) and len(load) == 1
    assert load[0]["dp_rank"] == 0
    assert {"num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load[0])
    assert all(isinstance(load[0][k], int) and load[0][k] >= 0 for k in ("num_reqs", "num_tokens"))


def test_router_reads_worker_loads(dp):
    """The router's own /get_loads sums each worker's /get_load num_tokens (-1 when unreadable)."""
    loads = httpx.get(dp.router_url + "/get_loads", timeout=30).json()["workers"]
    assert sorted(w["worker"] for w in loads) == sorted(dp.worker_urls)
    assert all(w["load"] >= 0 for w in loads)


def test_server_and_model_info_under_both_names(dp):
    url = dp.worker_urls[0]
    new, old = (httpx.get(url + p, timeout=30).json() for p in ("/server_info", "/get_server_info"))
    assert new["model"] == old["model"] == "tiny-llama"
    assert new["model_path"] == "tiny-llama" and new["dp_size"] == 1 and new["max_total_tokens"] > 0
    assert httpx.get(url + "/model_info", timeout=30).json() == httpx.get(url + "/get_model_info", timeout=30).json()


def test_router_registers_workers_under_their_model(dp):
    workers = httpx.get(dp.router_url + "/workers", timeout=30).json()["workers"]
    assert sorted(w["url"] for w in workers) == sorted(dp.worker_urls)
    assert all(w["is_healthy"] and w["model_id"] == "tiny-llama" for w in workers)
    models = httpx.get(dp.router_url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]


def test_load_entry_counts_held_slots_not_reclaimable_cache():
    info = {"kv_total": 100, "kv_available": 60, "tree_evictable_tokens": 30, "num_running": 2, "num_waiting": 1}
    assert load_entry(info) == {"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1, "num_tokens": 10}


def test_memory_fractions_give_equal_shares():
    fr = memory_fractions(["0", "0", "0", "0"], 0.8)
    free, shares = 1.0, []
    for f in fr:
        assert f is not None
        shares.append(free * f)
        free -= free * f
    assert all(abs(s - 0.2) < 1e-9 for s in shares)
    assert memory_fractions(["0", "1"], 0.8) == [None, None]


def test_start_rounds_one_worker_per_device_at_a_time():
    specs = [WorkerSpec(i, 1000 + i, d) for i, d in enumerate(["0", "0", "1", "0"])]
    assert [[s.index for s in r] for r in start_rounds(specs)] == [[0, 2], [1], [3]]
    cpu = [WorkerSpec(i, 1000 + i) for i in range(3)]
    assert [[s.index for s in r] for r in start_rounds(cpu)] == [[0, 1, 2]]


def test_router_flags_pass_only_what_is_set():
    flags = router_flags(RouterConfig(policy="round_robin", balance_abs_threshold=4, extra_args=("--x", "1")))
    assert flags[:2] == ["--policy", "round_robin"]
    assert "--balance-abs-threshold" in flags and "--cache-threshold" not in flags
    assert flags[-2:] == ["--x", "1"]
