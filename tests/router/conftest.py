"""Three tiny-model workers behind sglang-router (`DataParallel`), shared by the router tests, and more
routers with other settings in front of the same workers."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

pytest.importorskip("sglang_router")

from rlserve.router.config import RouterConfig  # noqa: E402
from rlserve.router.dp import DataParallel  # noqa: E402
from rlserve.router.launch import RouterProcess  # noqa: E402

TINY_FLAGS = ["--model", "tiny-llama", "--max-total-tokens", "16384", "--max-model-len", "512",
              "--log-level", "warning", "--drain-timeout", "5"]
HEALTH_INTERVAL_S = 1


@pytest.fixture(scope="session")
def dp(tmp_path_factory, default_model_dir) -> Any:
    """`rlserve serve --dp 3` in-process: three workers and a cache_aware router (default thresholds)."""
    cfg = RouterConfig(policy="cache_aware", health_check_interval_secs=HEALTH_INTERVAL_S)
    d = DataParallel(TINY_FLAGS, 3, router=cfg, log_dir=tmp_path_factory.mktemp("dp-logs"), drain_timeout=5)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def supervised(dp):
    """The supervisor's poll loop in a thread (as `rlserve serve --dp` runs it)."""
    import threading

    t = threading.Thread(target=dp.run, kwargs={"poll_s": 0.2}, daemon=True)
    t.start()
    yield dp


@pytest.fixture(scope="session")
def router_factory(dp, tmp_path_factory) -> Any:
    """Another router, configured by RouterConfig's fields, in front of the same workers."""
    started: list[RouterProcess] = []
    log_dir = tmp_path_factory.mktemp("router-logs")

    def make(**fields: Any) -> RouterProcess:
        from rlserve.net import free_port

        port = free_port()
        r = RouterProcess(RouterConfig(health_check_interval_secs=HEALTH_INTERVAL_S, **fields), dp.worker_urls,
                          "127.0.0.1", port, log_dir / f"router-{port}.log", drain_timeout=5)
        started.append(r)
        r.start()
        r.wait_workers(dp.worker_urls)
        return r
    yield make
    for r in started:
        r.stop()


def server_info(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/get_server_info", timeout=30)
    r.raise_for_status()
    return r.json()


def served_tokens(url: str) -> int:
    """Prompt tokens a worker has taken in (computed + from its prefix cache)."""
    stats = server_info(url)["stats"]
    return int(stats["prompt_tokens"] + stats["cached_tokens"])


def flush_all(urls: list[str]) -> None:
    for u in urls:
        assert httpx.post(u + "/flush_cache", timeout=30).status_code == 200


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll until `condition()`; the timeout only ends a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.1)
