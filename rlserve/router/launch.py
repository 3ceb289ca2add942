"""sglang-router as a child process (`python -m sglang_router.launch_router`), and its worker routes.

The router keeps a registry of workers: GET /workers lists them ({"workers": [{"id", "url",
"is_healthy", ...}]}), POST /workers {"url"} queues an addition (answered 202; the router then checks
/health and reads /server_info and /model_info before routing to it), DELETE /workers/{id} queues a
removal. Its own metrics go to a Prometheus port of their own.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from rlserve.net import free_port
from rlserve.router.config import RouterConfig, router_flags
from rlserve.router.procs import ManagedProcess, wait_http_ok

log = logging.getLogger("rlserve.router")
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 10.0


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

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> RouterProcess:
        """Start and wait until the router answers (workers given at start may still be registering:
        wait_workers waits for them)."""
        self.process.start()
        wait_http_ok(self.process, self.url + "/workers", timeout)
        return self

    # ---- the worker registry ----
    def workers(self) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/workers", timeout=CALL_TIMEOUT_S)
        r.raise_for_status()
        return list(r.json().get("workers", []))

    def healthy_urls(self) -> list[str]:
        return [w["url"] for w in self.workers() if w.get("is_healthy")]

    def wait_workers(self, urls: Sequence[str], timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Until every URL in `urls` is registered and healthy in the router."""
        deadline = time.monotonic() + timeout
        while True:
            missing = set(urls) - set(self.healthy_urls())
            if not missing:
                return
            if not self.process.alive():
                raise RuntimeError(f"the router exited with {self.process.returncode()}:\n{self.process.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not take {sorted(missing)} within {timeout:.0f} s:\n"
                                   f"{self.process.tail()}")
            time.sleep(0.2)

    def add_worker(self, url: str) -> None:
        r = httpx.post(self.url + "/workers", json={"url": url}, timeout=CALL_TIMEOUT_S)
        if r.status_code >= 400:
            raise RuntimeError(f"the router refused worker {url}: {r.status_code} {r.text}")

    def remove_worker(self, url: str) -> bool:
        """Take `url` out of the router (its prefix tree goes with it); False if it was not registered."""
        found = [w["id"] for w in self.workers() if w["url"] == url]
        for wid in found:
            r = httpx.delete(f"{self.url}/workers/{wid}", timeout=CALL_TIMEOUT_S)
            if r.status_code >= 400 and r.status_code != 404:
                raise RuntimeError(f"the router did not remove worker {url}: {r.status_code} {r.text}")
        return bool(found)

    def wait_removed(self, url: str, timeout: float = CALL_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while any(w["url"] == url for w in self.workers()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router still lists {url} after {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self.process.stop(timeout)
