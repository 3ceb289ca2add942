"""Data parallelism: N engine servers on loopback ports behind sglang-router on the public address.

`DataParallel(...).start()` starts the workers (`python -m rlserve.server`, one process group each),
waits for them, then starts the router in front of them. `poll()` watches the workers: one that exits
is reported, taken out of the router, restarted on the same port (at most `max_restarts` times) and,
once healthy, added back. `stop()` sends SIGTERM to the router and every worker at once: each drains
its in-flight requests and exits. `worker_urls` and `router_url` are what clients (and the fan-out of
admin operations) talk to.

Workers on one CUDA device split its memory: they start one after the other, each taking an equal
share of what the device had free, as a fraction of what is free when it starts.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlserve.net import free_port
from rlserve.router.config import RouterConfig
from rlserve.router.launch import RouterProcess
from rlserve.router.procs import ManagedProcess, wait_http_ok

log = logging.getLogger("rlserve.router")
WORKER_STARTUP_TIMEOUT_S = 600.0
RESTART_BACKOFF_S = 1.0


@dataclass
class WorkerSpec:
    index: int
    port: int
    device: str | None = None            # CUDA_VISIBLE_DEVICES for it; None: as the engine flags say
    memory_fraction: float | None = None  # --gpu-memory-fraction override when it shares a device

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def memory_fractions(devices: Sequence[str], fraction: float) -> list[float | None]:
    """Worker i's --gpu-memory-fraction: None when alone on its device; else the j-th of k workers on
    one device (started in that order) takes fraction/k of the memory free before any of them, which
    is (fraction/k) / (1 - j·fraction/k) of the memory still free when it starts."""
    out: list[float | None] = []
    seen: dict[str, int] = {}
    for d in devices:
        k = devices.count(d)
        j = seen[d] = seen.get(d, -1) + 1
        share = fraction / k
        out.append(None if k == 1 else min(1.0, share / (1 - j * share)))
    return out


def start_rounds(specs: Sequence[WorkerSpec]) -> list[list[WorkerSpec]]:
    """Rounds of workers to start together: one worker per device a round (all at once without devices)."""
    rounds: list[list[WorkerSpec]] = []
    seen: dict[str | None, int] = {}
    for s in specs:
        r = seen[s.device] = seen.get(s.device, -1) + 1 if s.device is not None else 0
        while len(rounds) <= r:
            rounds.append([])
        rounds[r].append(s)
    return rounds


class Worker:
    """A worker's process and its supervision state: up, restarting or failed."""

    def __init__(self, spec: WorkerSpec, server_flags: Sequence[str], log_dir: Path) -> None:
        self.spec = spec
        self.url = spec.url
        cmd = [sys.executable, "-m", "rlserve.server", "--host", "127.0.0.1", "--port", str(spec.port),
               *server_flags]
        if spec.device is not None:
            cmd += ["--device", "cuda"]          # the one device CUDA_VISIBLE_DEVICES leaves it
        if spec.memory_fraction is not None:
            cmd += ["--gpu-memory-fraction", f"{spec.memory_fraction:.4f}"]
        env = {"CUDA_VISIBLE_DEVICES": spec.device} if spec.device is not None else None
        self.process = ManagedProcess(f"worker {spec.index}", cmd, log_dir / f"worker-{spec.index}.log", env)
        self.state = "up"
        self.restarts = 0

    def wait_ready(self, timeout: float = WORKER_STARTUP_TIMEOUT_S) -> None:
        wait_http_ok(self.process, self.url + "/health", timeout)


class DataParallel:
    """N workers and the router; see the module docstring. Use as a context manager or start()/stop()."""

    def __init__(self, server_flags: Sequence[str], dp: int, *, host: str = "127.0.0.1", port: int | None = None,
                 router: RouterConfig | None = None, log_dir: Path, devices: Sequence[str] | None = None,
                 gpu_memory_fraction: float = 0.85, max_restarts: int = 3, drain_timeout: float = 30.0) -> None:
        if dp < 1:
            raise ValueError(f"--dp must be at least 1, got {dp}")
        if devices is not None and len(devices) != dp:
            raise ValueError(f"--devices lists {len(devices)} device(s) for --dp {dp}")
        fractions = memory_fractions(devices, gpu_memory_fraction) if devices else [None] * dp
        self.specs = [WorkerSpec(i, free_port(), devices[i] if devices else None, fractions[i]) for i in range(dp)]
        self.workers = [Worker(s, server_flags, log_dir) for s in self.specs]
        self.router_cfg = router or RouterConfig()
        self.host = host
        self.port = port or free_port()
        self.log_dir = log_dir
        self.max_restarts = max_restarts
        self.drain_timeout = drain_timeout
        self.router: RouterProcess | None = None
        self._stopping = threading.Event()

    @property
    def worker_urls(self) -> list[str]:
        return [w.url for w in self.workers]

    @property
    def router_url(self) -> str:
        assert self.router is not None, "start() first"
        return self.router.url

    @property
    def metrics_url(self) -> str:
        """The router's Prometheus metrics; `metrics_summary()` joins them with the workers' own."""
        assert self.router is not None, "start() first"
        return self.router.metrics_url

    def metrics_summary(self) -> dict[str, dict[str, Any]]:
        """Per worker: requests the router sent it, its health, its own request and prefix-cache counters."""
        from rlserve.router.metrics import summary

        return summary(self.metrics_url, self.worker_urls)

    def start(self) -> DataParallel:
        try:
            for batch in start_rounds(self.specs):
                for s in batch:
                    self.workers[s.index].process.start()
                for s in batch:
                    self.workers[s.index].wait_ready()
            self.router = RouterProcess(self.router_cfg, self.worker_urls, self.host, self.port,
                                        self.log_dir / "router.log", self.drain_timeout).start()
            self.router.wait_workers(self.worker_urls)
        except BaseException:
            self.stop()
            raise
        log.info("router on http://%s:%d in front of %s; its metrics on %s", self.host, self.port,
                 ", ".join(self.worker_urls), self.router.metrics_url)
        return self

    # ---- supervision ----
    def poll(self) -> None:
        """Notice workers that exited; each is taken out of the router and restarted in a thread."""
        if self._stopping.is_set():
            return
        for w in self.workers:
            if w.state == "up" and not w.process.alive():
                code = w.process.returncode()
                log.error("worker %d (%s) exited with %s; its log ends:\n%s", w.spec.index, w.url, code,
                          w.process.tail(2000))
                w.state = "restarting" if w.restarts < self.max_restarts else "failed"
                self._drop(w)
                if w.state == "restarting":
                    threading.Thread(target=self._revive, args=(w,), daemon=True,
                                     name=f"revive-worker-{w.spec.index}").start()
                else:
                    log.error("worker %d failed %d restart(s); it stays out of the router", w.spec.index,
                              self.max_restarts)

    def _drop(self, w: Worker) -> None:
        try:
            if self.router is not None:
                self.router.remove_worker(w.url)
        except Exception as e:           # the router's health checks take it out anyway
            log.warning("could not remove %s from the router: %s", w.url, e)

    def _revive(self, w: Worker) -> None:
        w.restarts += 1
        time.sleep(RESTART_BACKOFF_S * w.restarts)
        if self._stopping.is_set():
            return
        log.warning("restarting worker %d (restart %d of %d)", w.spec.index, w.restarts, self.max_restarts)
        try:
            w.process.kill_group()
            w.process.start()
            w.wait_ready()
            if self._stopping.is_set():
                return
            assert self.router is not None
            self.router.add_worker(w.url)
            self.router.wait_workers([w.url])
        except Exception as e:
            log.error("worker %d did not come back: %s", w.spec.index, e)
            w.process.stop(self.drain_timeout)
            w.state = "up"               # poll() sees it dead and decides again
            return
        w.state = "up"
        log.warning("worker %d is back in the router", w.spec.index)

    def run(self, poll_s: float = 0.5) -> None:
        """Supervise until stop_event() (e.g. from a signal handler) or until no worker is left."""
        while not self._stopping.wait(poll_s):
            self.poll()
            if all(w.state == "failed" for w in self.workers):
                log.error("every worker failed; stopping")
                return
            if self.router is not None and not self.router.process.alive():
                log.error("the router exited with %s:\n%s", self.router.process.returncode(),
                          self.router.process.tail(2000))
                return

    def stop_event(self) -> None:
        self._stopping.set()

    def stop(self) -> None:
        """SIGTERM to the router and every worker together; wait for all (SIGKILL past the drain)."""
        self._stopping.set()
        procs = [w.process for w in self.workers] + ([self.router.process] if self.router else [])
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(self.drain_timeout + 30)

    def __enter__(self) -> DataParallel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
