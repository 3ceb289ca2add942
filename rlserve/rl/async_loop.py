"""Asynchronous training in server mode (asynchronous.mode): rollout overlaps the update.

one_step_off: right after step n pushes its weights (version n), step n+1's rollout is submitted to the
servers from a background thread while step n trains on the rollout submitted one step earlier (drawn by
version n − 1). Every sample is exactly one version stale; step 0 draws its own rollout first.

Agentic rollouts (rollout.agent) take part in both: a group is a prompt's multi-turn samples (each turn one
/generate request, rl/agent/rollout.py: AgentDrawer), and its version is the oldest token's over all its
samples, so no sample staler than the bound is trained on.

full: producer threads keep submitting prompt groups (groups_in_flight per request batch), each chunk
started only as fast as the steps can take it within the bound, and put each finished group in a
StalenessBuffer tagged with its oldest token's weight version (the servers report
weight_version_spans; a request running across a push continues under the new weights in place). Each
step pushes the trainer's weights (version = step), then takes prompts_per_step groups whose oldest token is
at most max_staleness versions behind, dropping (and counting) staler ones.

The colocated engine serves the very module the optimizer updates, so there rollouts cannot overlap the
update: colocated runs with an asynchronous mode run synchronously (the trainer warns).
"""
from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from rlserve.rl.batch import Rollout
from rlserve.rl.config import TrainConfig
from rlserve.rl.draw_process import close_drawer, process_drawer, run_drawer
from rlserve.rl.drawers import Drawer, Encoded, make_drawer
from rlserve.rl.rewards import RewardFn

if TYPE_CHECKING:
    from rlserve.llm import LLM
    from rlserve.rl.remote import RemoteRollout
    from rlserve.rl.train import Timer

T = TypeVar("T")


class StalenessBuffer(Generic[T]):
    """Finished items (prompt groups), each with the weight version of its oldest token; thread-safe. A
    take at trainer version v hands out only items with v − oldest ≤ max_staleness: staler ones are
    dropped then (an item only grows staler while it waits).

    With `admission` = (items a step takes, max_staleness), producers also ask before they start items
    (`admit`): the items started and not dropped stay within what the steps up to version + max_staleness
    take. An item started at version v is then among the first (v + 1 + max_staleness) · per_step, so,
    with items coming back in the order they started, it is taken by step v + max_staleness: nothing is
    generated only to be dropped. Without it, producers ran ahead as far as the buffer's room and a third
    of what they generated went stale. Items that come back out of order are still dropped at take."""

    def __init__(self, capacity: int, admission: tuple[int, int] | None = None) -> None:
        self.capacity = capacity
        self.admission = admission
        self._items: deque[tuple[T, int]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self.dropped = 0
        self.started = 0
        self.version = 0                          # the newest version a take was made at

    def admit(self, n: int) -> bool:
        """Block until n more items may start (see the class); False once closed (the producer stops)."""
        with self._cond:
            if self.admission is not None:
                per_step, max_staleness = self.admission
                while (self.started - self.dropped >= (self.version + 1 + max_staleness) * per_step
                       and not self._closed):
                    self._cond.wait()
            if self._closed:
                return False
            self.started += n
            return True

    def unadmit(self, n: int) -> None:
        """n admitted items that never started (the prompt source ran short)."""
        with self._cond:
            self.started -= n
            self._cond.notify_all()

    def put(self, item: T, oldest_version: int) -> None:
        with self._cond:
            self._items.append((item, oldest_version))
            self._cond.notify_all()

    def wait_for_room(self) -> bool:
        """Block while the buffer is full; False once closed (the producer stops)."""
        with self._cond:
            while len(self._items) >= self.capacity and not self._closed:
                self._cond.wait()
            return not self._closed

    def take(self, n: int, version: int, max_staleness: int) -> tuple[list[tuple[T, int]], int]:
        """n (item, oldest version) pairs within the bound, oldest first, and how many stale ones were
        dropped meanwhile. Blocks until there are n; raises the producer's error, or once closed."""
        if n > self.capacity:
            raise ValueError(f"cannot take {n} items from a buffer that holds {self.capacity}")
        dropped = 0
        with self._cond:
            if version > self.version:
                self.version = version
                self._cond.notify_all()          # a newer version admits more
            while True:
                fresh = deque(p for p in self._items if version - p[1] <= max_staleness)
                stale = len(self._items) - len(fresh)
                self._items = fresh
                if stale:
                    dropped += stale
                    self.dropped += stale
                    self._cond.notify_all()      # room for the producer
                if len(fresh) >= n:
                    out = [fresh.popleft() for _ in range(n)]
                    self._cond.notify_all()
                    return out, dropped
                if self._error is not None:
                    raise RuntimeError("the rollout producer failed") from self._error
                if self._closed:
                    raise RuntimeError("the rollout buffer is closed")
                self._cond.wait()

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._closed = True
            self._error = self._error or error
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class OneStepOff:
    """Step n trains on the rollout submitted at step n − 1 while step n + 1's is drawn."""

    def __init__(self, cfg: TrainConfig, llm: LLM, remote: RemoteRollout, reward_fn: RewardFn,
                 take: Callable[[int], Encoded], drawer: Drawer | None = None) -> None:
        self.cfg, self.llm, self.remote, self.reward_fn, self.take = cfg, llm, remote, reward_fn, take
        self.drawer = drawer or run_drawer(cfg, llm, remote, reward_fn, 1)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self.future: Future[list[Any]] | None = None

    def _draw(self, encoded: Encoded, seed: int, version: int) -> list[Any]:
        return self.drawer.draw(encoded, seed, version)

    def next(self, step: int, seed: int, timer: Timer) -> tuple[Rollout, dict[str, float]]:
        need = self.cfg.task.prompts_per_step
        if self.future is None:                  # the first step has nothing in flight: draw it now
            with timer("push_s"):
                self.remote.push_weights(self.llm, step)
            with timer("rollout_s"):
                groups = self._draw(self.take(need), (seed + 2**30) % 2**31, step)
        else:
            with timer("rollout_wait_s"):        # what the update did not hide
                groups = self.future.result()
            with timer("push_s"):
                self.remote.push_weights(self.llm, step)
        # The next step's rollout, drawn by the weights just pushed while this step trains.
        self.future = self.pool.submit(self._draw, self.take(need), seed, step)
        rollout = self.drawer.rollout(groups)
        return rollout, {**rollout.metrics, **staleness_metrics(groups, step)}

    def close(self) -> None:
        if self.future is not None:
            self.future.cancel()
        self.pool.shutdown(wait=True)
        close_drawer(self.drawer)


class FullAsync:
    """Producer threads fill a StalenessBuffer; each step takes what is fresh enough.

    Each producer draws `groups_in_flight` groups at a time and waits for the chunk's slowest sample. With
    `asynchronous.producers` > 1 the chunks overlap: while one chunk's long tail finishes, another's groups
    are already generating, so the servers do not idle on stragglers between chunks."""

    def __init__(self, cfg: TrainConfig, llm: LLM, remote: RemoteRollout, reward_fn: RewardFn,
                 take: Callable[[int], Encoded], drawer: Drawer | None = None) -> None:
        self.cfg, self.llm, self.remote, self.reward_fn = cfg, llm, remote, reward_fn
        producers = cfg.asynchronous.producers
        # a drawer per producer: an agent drawer keeps its own tokenizer, which threads must not share (a
        # rollout process keeps one per thread of its own)
        if drawer is None and cfg.asynchronous.rollout_process:
            drawer = process_drawer(cfg, llm, remote, reward_fn, producers)
        self.drawers = [drawer] * producers if drawer else [make_drawer(cfg, llm, remote, reward_fn)
                                                          for _ in range(producers)]
        self.drawer = self.drawers[0]
        take_lock = threading.Lock()

        def locked_take(n: int) -> Encoded:       # the prompt source is not thread-safe
            with take_lock:
                return take(n)
        self.take = locked_take
        self.chunk = cfg.asynchronous.groups_in_flight or cfg.task.prompts_per_step
        # room for the next step's groups and one chunk per producer in flight beyond them; chunks start
        # only as fast as the steps will take them within max_staleness
        self.buffer: StalenessBuffer[Any] = StalenessBuffer(
            cfg.task.prompts_per_step + producers * self.chunk,
            admission=(cfg.task.prompts_per_step, cfg.asynchronous.max_staleness))
        self.threads: list[threading.Thread] = []
        self.version = 0                          # the newest pushed, read by the producers for empty groups

    def _produce(self, drawer: Drawer, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while self.buffer.wait_for_room() and self.buffer.admit(self.chunk):
                version = self.version
                encoded = self.take(self.chunk)
                if len(encoded) < self.chunk:
                    self.buffer.unadmit(self.chunk - len(encoded))
                groups = drawer.draw(encoded, rng.randrange(2**31), version)
                for g in groups:
                    oldest = g.oldest_version
                    self.buffer.put(g, version if oldest is None else oldest)
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, which raises it
            self.buffer.close(e)

    def next(self, step: int, seed: int, timer: Timer) -> tuple[Rollout, dict[str, float]]:
        with timer("push_s"):          # requests in flight continue under the new weights
            self.remote.push_weights(self.llm, step)
        self.version = step
        if not self.threads:
            self.threads = [threading.Thread(target=self._produce, args=(d, seed + i), name=f"rollout-producer-{i}",
                                             daemon=True) for i, d in enumerate(self.drawers)]
            for t in self.threads:
                t.start()
        with timer("rollout_wait_s"):
            taken, dropped = self.buffer.take(self.cfg.task.prompts_per_step, step,
                                              self.cfg.asynchronous.max_staleness)
        groups = [g for g, _ in taken]
        rollout = self.drawer.rollout(groups)
        return rollout, {**rollout.metrics, **staleness_metrics(groups, step), "groups_dropped_stale": float(dropped)}

    def close(self) -> None:
        self.buffer.close()
        for t in self.threads:
            t.join()
        close_drawer(self.drawer)


def staleness_metrics(groups: list[Any], version: int) -> dict[str, float]:
    oldest = [g.oldest_version for g in groups if g.oldest_version is not None]
    if not oldest:
        return {}
    lags = torch.tensor([version - v for v in oldest], dtype=torch.float32)
    return {"staleness_mean": lags.mean().item(), "staleness_max": lags.max().item()}
