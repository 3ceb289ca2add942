"""Continuous batching: which requests run this step.

Prefill first: admit waiting requests (longest cached prefix first under `lpm`) while the step's token
budget and the KV pool allow, splitting a long prompt into chunks; otherwise decode every running
request, retracting the newest ones back to waiting when the pool runs dry.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlserve.config import SchedulerConfig
from rlserve.engine.memory import RequestMemory
from rlserve.engine.request import Request
from rlserve.engine.sampler import has_penalties

LPM_MAX_QUEUE = 128   # sorting by prefix match costs a tree walk per waiting request
# A waiting request that shares at least this many uncached leading tokens with a prompt being prefilled
# now waits a step and then reads them from the prefix cache instead of computing them again.
IN_BATCH_SHARED_MIN = 64


def _head(req: Request, n: int) -> list[int]:
    """The first n tokens of req.fill_ids without building the whole list (the prompt usually has them)."""
    return req.prompt_ids[:n] if n <= len(req.prompt_ids) else req.fill_ids[:n]


def rows_may_overlap(reqs: list[Request]) -> bool:
    """Whether these rows' next tokens can be sampled without the host (no penalties, which read every
    earlier token; no tokens banned until min_tokens are out), so a step can launch before the last
    one's tokens are read."""
    return all(not has_penalties(r.params) and len(r.output_ids) >= r.params.min_tokens for r in reqs)


@dataclass
class ScheduledBatch:
    """One step's plan."""
    reqs: list[Request]
    is_decode: bool
    # Prefill only: whether each request's prompt is now complete (so it samples its next token).
    completes: list[bool]
    overlap: bool | None = None    # may_overlap, when the scheduler knows it already

    @property
    def may_overlap(self) -> bool:
        """Whether the step may run overlapped: launched now, its tokens read by the next step. A decode
        step may if its rows need no host work before sampling (grammar rows wait on the device side for
        their masks); a prefill step's first tokens also must need no grammar mask or logprobs."""
        if self.overlap is None:
            self.overlap = rows_may_overlap(self.reqs) and (self.is_decode or all(
                not r.constrained and r.params.logprobs is None and r.params.prompt_logprobs is None
                and r.pooling is None for r in self.reqs))
        return self.overlap


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, memory: RequestMemory) -> None:
        self.cfg = cfg
        self.memory = memory
        self.waiting: list[Request] = []
        self.running: list[Request] = []       # prompt done, decoding
        self.chunked: Request | None = None    # a prompt part-way through chunked prefill
        self.new_token_ratio = cfg.init_new_token_ratio
        self.prefilled_groups: set[str] = set()
        self.num_retractions = 0

    # ---- queue ----
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def num_waiting(self) -> int:
        """Requests queued for admission: each sample of an n > 1 request counts, retracted ones too."""
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked)

    def live(self) -> list[Request]:
        return self.waiting + self.running + ([self.chunked] if self.chunked else [])

    def remove(self, req: Request) -> None:
        """Take a request out of every queue and free its memory (finish or abort)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        if self.chunked is req:
            self.chunked = None
        self.memory.release(req, cache=True)
        if req.index == 0:
            self.prefilled_groups.add(req.group)   # siblings may no longer wait on it

    def forget_group(self, group: str) -> None:
        self.prefilled_groups.discard(group)

    # ---- one step ----
    def schedule(self) -> ScheduledBatch | None:
        batch = self.schedule_prefill()
        if batch is not None:
            return batch
        if self.running:
            return self._schedule_decode()
        return None

    def schedule_ahead(self) -> ScheduledBatch | None:
        """The next decode step, planned while the running requests' last tokens are still on the device;
        None when that plan could differ from the one made after reading them: a prompt is being
        chunked, a waiting request might be admitted once a running one finishes (the batch has room),
        the pool is short, or a row needs its last token on the host before sampling."""
        full = len(self.running) >= self.cfg.max_running_requests
        if (self.chunked is None and self.running and (not self.waiting or full)
                and self.memory.available_tokens() >= 2 * len(self.running) and rows_may_overlap(self.running)):
            batch = self.schedule()
            if batch is not None:
                batch.overlap = True
            return batch
        return None

    def _reserved(self) -> float:
        return sum(r.remaining_new_tokens() for r in self.running) * self.new_token_ratio

    def _waiting_order(self) -> list[Request]:
        if self.cfg.policy == "lpm" and self.memory.tree is not None and len(self.waiting) <= LPM_MAX_QUEUE:
            match = {id(r): len(self.memory.tree.match_prefix(r.fill_ids[:-1]).indices) for r in self.waiting}
            return sorted(self.waiting, key=lambda r: (-match[id(r)], r.arrival))
        return sorted(self.waiting, key=lambda r: r.arrival)

    def _must_wait_for_sibling(self, req: Request) -> bool:
        # With the prefix cache on, samples 1..n-1 wait for sample 0's prompt KV and then share it.
        return (self.memory.tree is not None and req.params.n > 1 and req.index > 0
                and req.group not in self.prefilled_groups)

    def _shares_with_inflight(self, req: Request, admitted: list[Request]) -> bool:
        """Whether `req`'s next uncached tokens are also the prompt of a request being prefilled (in this
        batch, or chunk by chunk): then they will be in the prefix cache after this step."""
        if self.memory.tree is None:
            return False
        end = req.kv_len + IN_BATCH_SHARED_MIN
        if req.num_tokens <= end:
            return False
        head = _head(req, end)
        inflight = admitted + ([self.chunked] if self.chunked is not None and self.chunked not in admitted else [])
        return any(other.num_tokens > end and _head(other, end) == head for other in inflight)

    def schedule_prefill(self) -> ScheduledBatch | None:
        """The next prefill batch, or None when nothing waits or nothing more fits now."""
        budget = self.cfg.chunked_prefill_size
        assert budget is not None, "the engine sets the chunk size at construction"
        room = self.memory.available_tokens() - self._reserved()
        reqs: list[Request] = []
        completes: list[bool] = []

        candidates = ([self.chunked] if self.chunked else []) + self._waiting_order()
        for req in candidates:
            continuing = req is self.chunked
            if not continuing:
                if len(self.running) + len(reqs) >= self.cfg.max_running_requests:
                    break
                if self._must_wait_for_sibling(req):
                    continue
                # Prompt logprobs and mean pooling read every position: no cached prefix.
                use_cache = req.params.prompt_logprobs is None and not (req.pooling is not None and req.pooling.mean)
                self.memory.match_and_lock(req, use_cache=use_cache)
                if use_cache and self._shares_with_inflight(req, reqs):
                    self.memory.release(req, cache=False)
                    continue
            extend = req.num_tokens - req.kv_len
            chunk = min(extend, budget)
            done = chunk == extend
            need = chunk + (req.remaining_new_tokens() * self.new_token_ratio if done else 0)
            busy = bool(reqs or self.running)
            if chunk <= 0 or (need > room and busy) or chunk > self.memory.available_tokens():
                if not continuing:
                    self.memory.release(req, cache=False)
                break
            slots = self.memory.alloc_tokens(chunk)
            assert slots is not None
            self.memory.table.table[req.row, req.kv_len:req.kv_len + chunk] = slots
            if not req.admitted_once:
                req.cached_tokens, req.admitted_once = req.kv_len, True
            req.chunk_len = chunk
            reqs.append(req)
            completes.append(done)
            budget -= chunk
            room -= need
            if not continuing:
                self.waiting.remove(req)
            self.chunked = None if done else req
            if not done:
                break
        if not reqs:
            return None
        return ScheduledBatch(reqs, is_decode=False, completes=completes)

    def _schedule_decode(self) -> ScheduledBatch:
        while self.memory.available_tokens() < self.memory.decode_need(self.running) and len(self.running) > 1:
            self._retract(max(self.running, key=lambda r: r.arrival))
        self.new_token_ratio = max(self.cfg.min_new_token_ratio,
                                   self.new_token_ratio - self.cfg.new_token_ratio_decay)
        return ScheduledBatch(list(self.running), is_decode=True, completes=[])

    def _retract(self, req: Request) -> None:
        """Give a running request's KV back and requeue it; its tokens so far are recomputed later."""
        self._requeue(req)
        self.num_retractions += 1
        self.new_token_ratio = min(1.0, self.new_token_ratio + self.cfg.retract_ratio_step)

    def _requeue(self, req: Request) -> None:
        if self.chunked is req:
            self.chunked = None
        else:
            self.running.remove(req)
        self.memory.release(req, cache=True)     # its written KV stays in the prefix cache for the recompute
        self.waiting.append(req)

    def retract_all(self) -> int:
        """Requeue every running request and the prompt being chunked, their KV given back (pausing in
        retract mode; nothing may be in flight). Not counted as retractions: the pool did not run dry.
        Returns how many were requeued."""
        reqs = list(self.running) + ([self.chunked] if self.chunked is not None else [])
        for req in reqs:
            self._requeue(req)
        return len(reqs)

    def after_prefill(self, batch: ScheduledBatch) -> None:
        for req, done in zip(batch.reqs, batch.completes):
            req.kv_len += req.chunk_len
            self.memory.cache_written(req)
            if done:
                self.running.append(req)
                if req.index == 0:
                    self.prefilled_groups.add(req.group)

    def alloc_decode_slots(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """One new slot per decoding request; None for a lone request that has outgrown the pool."""
        return self.memory.alloc_decode(batch.reqs)
