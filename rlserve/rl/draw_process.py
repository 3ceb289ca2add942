"""Asynchronous training's draws in a child process (asynchronous.rollout_process).

A draw beside the trainer is mostly waiting on the servers, but what it does between the waits (HTTP,
JSON, rendering tool results into tokens, scoring) is Python, and in the trainer's process it takes the
trainer's GIL: every op the trainer launches releases the GIL and must win it back from the producer
threads. `ProcessDrawer` runs the very same drawer (rl/drawers.py: make_drawer) in a spawned child,
each producer thread's draw a request to it, answered with the finished groups; the trainer keeps only
the pickled groups' loading and `rollout()` (rewards are already in the groups for agents, computed from
them for single turns).

The child is built from a picklable factory (`DrawerSpec` for the run's own drawers), runs up to `threads`
draws at once (one drawer each: an agent drawer's tokenizer must not be shared by threads), exits when
asked, and stops on its own when its parent is gone. A draw that fails in the child fails the waiting
caller with the child's traceback; a child that dies fails every waiting draw with its exit code.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pickle
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlserve.rl.batch import Rollout
from rlserve.rl.drawers import Drawer, Encoded, SingleTurn, make_drawer

if TYPE_CHECKING:
    from rlserve.llm import LLM
    from rlserve.rl.config import RolloutSection, TrainConfig
    from rlserve.rl.remote import RemoteRollout
    from rlserve.rl.rewards import RewardFn

POLL_S = 1.0               # how often a blocked reader looks whether the other side is still there
STOP_TIMEOUT_S = 60.0      # close(): what the child's draws in flight may take before it is killed


@dataclass
class DrawerSpec:
    """What the child needs to build the run's drawer: its servers (or router), the rollout section, the
    reward function (it must pickle: a module-level function) and the engine's tokenizer."""
    rollout: RolloutSection
    urls: list[str]
    admin_api_key: str | None
    router_url: str | None
    reward_fn: RewardFn
    tokenizer: Any

    def __call__(self) -> Drawer:
        from rlserve.rl.remote import RemoteRollout

        # the child only generates: weight pushes stay with the trainer
        remote = RemoteRollout(self.urls, "tensor", self.admin_api_key, router_url=self.router_url)
        if self.rollout.agent.enabled:
            from rlserve.rl.agent.rollout import AgentDrawer
            return AgentDrawer(None, self.rollout, remote, self.reward_fn, tokenizer=self.tokenizer)
        return SingleTurn(self.rollout, remote, self.reward_fn)


def _child(factory: Callable[[], Drawer], requests: Any, results: Any, threads: int) -> None:
    """The child's loop: each request (id, encoded, seed, version) drawn on a pool thread with that thread's
    own drawer; None (or the parent gone) stops it once the draws in flight are answered."""
    local = threading.local()
    parent = os.getppid()

    def draw(req_id: int, encoded: Encoded, seed: int, version: int) -> None:
        try:
            if not hasattr(local, "drawer"):
                local.drawer = factory()
            results.put((req_id, True, local.drawer.draw(encoded, seed, version)))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller in the parent
            results.put((req_id, False, "".join(traceback.format_exception(e))))

    with ThreadPoolExecutor(threads, thread_name_prefix="draw") as pool:
        while os.getppid() == parent:
            try:
                item = requests.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if item is None:
                break
            pool.submit(draw, *item)
    results.put(None)


class ProcessDrawer:
    """A Drawer whose draws run in a child process (see the module notes); `local` makes the Rollouts.
    Thread-safe: producer threads call draw() at once, each waiting for its own answer."""

    def __init__(self, local: Drawer, factory: Callable[[], Drawer], threads: int = 1,
                 guard: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        """`guard`: around each wait for a draw (the run's server_failures: a launched server that died is
        reported with its log)."""
        self.local, self.guard = local, guard
        ctx = mp.get_context("spawn")        # never fork a process that holds CUDA state
        self._requests, self._results = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_child, args=(factory, self._requests, self._results, threads),
                                   name="rollout-draws", daemon=True)
        self.process.start()
        self._waiting: dict[int, Future[list[Any]]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="rollout-draws-reader", daemon=True)
        self._reader.start()

    def draw(self, encoded: Encoded, seed: int, version: int) -> list[Any]:
        fut: Future[list[Any]] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the rollout process is closed")
            req_id = next(self._ids)
            self._waiting[req_id] = fut
        self._requests.put((req_id, encoded, seed, version))
        with self.guard():
            return fut.result()

    def rollout(self, groups: list[Any]) -> Rollout:
        return self.local.rollout(groups)

    def _read(self) -> None:
        while True:
            try:
                item = self._results.get(timeout=POLL_S)
            except queue.Empty:
                if self.process.is_alive():
                    continue
                self._fail_all(f"the rollout process exited (code {self.process.exitcode}) with draws in flight")
                return
            if item is None:                  # the child stopped after answering everything it took
                self._fail_all("the rollout process stopped")
                return
            req_id, ok, payload = item
            with self._lock:
                fut = self._waiting.pop(req_id, None)
            if fut is None:
                continue
            if ok:
                fut.set_result(payload)
            else:
                fut.set_exception(RuntimeError(f"a draw failed in the rollout process:\n{payload}"))

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            fut.set_exception(RuntimeError(why))

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the child to stop once its draws in flight are answered; kill it past `timeout`."""
        with self._lock:
            self._closed = True
        # requests a dead child never read must not hold this process's exit (the queue's feeder thread
        # would wait to flush them into a pipe nobody drains)
        self._requests.cancel_join_thread()
        if self.process.is_alive():
            self._requests.put(None)
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._reader.join(POLL_S * 3)
        self._fail_all("the rollout process is closed")


def process_drawer(cfg: TrainConfig, llm: LLM, remote: RemoteRollout, reward_fn: RewardFn, threads: int) -> Drawer:
    """The run's drawer in a child process (asynchronous.rollout_process; rl/draw_process.py)."""
    try:
        pickle.dumps(reward_fn)
    except Exception as e:
        raise ValueError(f"asynchronous.rollout_process: the reward function {reward_fn!r} does not pickle "
                         f"({e}); give a module-level function, or turn rollout_process off") from e
    router = remote.router.base_url if remote.router is not None else None
    key = remote.admin_api_key
    spec = DrawerSpec(cfg.rollout, remote.urls, key, router, reward_fn, llm.engine.tokenizer)
    return ProcessDrawer(make_drawer(cfg, llm, remote, reward_fn), spec, threads, remote.server_failures)


def run_drawer(cfg: TrainConfig, llm: LLM, remote: RemoteRollout, reward_fn: RewardFn, threads: int) -> Drawer:
    if cfg.asynchronous.rollout_process:
        return process_drawer(cfg, llm, remote, reward_fn, threads)
    return make_drawer(cfg, llm, remote, reward_fn)


def close_drawer(drawer: Drawer) -> None:
    close = getattr(drawer, "close", None)      # a ProcessDrawer stops its child
    if close is not None:
        close()
