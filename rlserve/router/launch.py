"""sglang-router as a child process (`python -m sglang_router.launch_router`), its worker registry
(registry.py) and its Prometheus metrics, on a port of their own (`metrics_url`)."""
from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlserve.net import free_port
from rlserve.router.config import RouterConfig, router_flags
from rlserve.router.procs import ManagedProcess, wait_http_ok
from rlserve.router.registry import CALL_TIMEOUT_S, WorkerRegistry

log = logging.getLogger("rlserve.router")
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


def require_router() -> None:
    if importlib.util.find_spec("sglang_router") is None:
        raise ValueError("the router needs sglang-router: pip install 'rlserve[router]'")


class RouterProcess:
    """The router on host:port in front of `worker_urls` (more can be added later)."""

    def __init__(self, cfg: RouterConfig, worker_urls: Sequence[str], host: str, port: int, log_path: Path,
                 drain_timeout: float = 30.0) -> None:
        require_router()
        self.cfg = cfg
        self.host, self.port = host, port
        connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.url = f"http://{connect}:{port}"
        self.prometheus_port = cfg.prometheus_port or free_port()
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.prometheus_port),
               # in-flight requests get as long as the workers' own drain at shutdown
               "--shutdown-grace-period-secs", str(max(1, round(drain_timeout))),
               *router_flags(cfg)]
        if worker_urls:
            cmd += ["--worker-urls", *worker_urls]
        self.process = ManagedProcess("the router", cmd, log_path)
        self.registry = WorkerRegistry(self.url)

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> RouterProcess:
        """Start and wait until the router answers (workers given at start may still be registering:
        wait_workers waits for them)."""
        self.process.start()
        wait_http_ok(self.process, self.url + "/workers", timeout)
        return self

    @property
    def metrics_url(self) -> str:
        """The router's Prometheus metrics (smg_* series: requests, per-worker health and circuit breaker)."""
        return f"http://127.0.0.1:{self.prometheus_port}/metrics"

    # ---- the worker registry (registry.py) ----
    def workers(self) -> list[dict[str, Any]]:
        return self.registry.workers()

    def healthy_urls(self) -> list[str]:
        return self.registry.healthy_urls()

    def wait_workers(self, urls: Sequence[str], timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Until every URL in `urls` is registered and healthy in the router."""
        def alive() -> None:
            if not self.process.alive():
                raise RuntimeError(f"the router exited with {self.process.returncode()}:\n{self.process.tail()}")
        try:
            self.registry.wait_healthy(urls, timeout, alive)
        except RuntimeError as e:
            raise RuntimeError(f"{e}:\n{self.process.tail()}") from None

    def add_worker(self, url: str) -> None:
        self.registry.add(url)

    def remove_worker(self, url: str) -> bool:
        """Take `url` out of the router; False if it was not registered."""
        return self.registry.remove(url)

    def wait_removed(self, url: str, timeout: float = CALL_TIMEOUT_S) -> None:
        self.registry.wait_removed(url, timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self.process.stop(timeout)
