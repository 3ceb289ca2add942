"""Launching a planned step on the device and collecting its samples.

A step launched overlapped (`launch`) is sampled on the device and its tokens are read by the next
step (`collect`), after that step's own launch: a decode step takes the previous step's samples as its
inputs while they are still on the device, so the host does the previous step's work (stops,
detokenizing) while the device runs the next one. A request that stops at step N has had one extra
token computed at N+1; it is dropped. Rows under a grammar need masks built from every earlier token:
their sampling is deferred until the previous step's tokens are taken (`finish`), or, where the mask
helpers fill every constrained row, queued at once behind a device-side wait for their answers.
A synchronous step (`run`) samples and reads its tokens right away.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol, cast

import torch

from rlserve.engine.grammar import Constraints, MaskTicket
from rlserve.engine.request import Request
from rlserve.engine.sampler import Sampler, SampleRow, logprob_dicts, logprob_logits, logprob_tensors, prompt_logprobs
from rlserve.engine.scheduler import ScheduledBatch, Scheduler
from rlserve.engine.status import LoopCounters
from rlserve.engine.transfer import HostCopy, to_device

Logprobs = dict[int, float] | None


class LoopParts(Protocol):
    """What a step uses of the engine (read on every call: warm-up and memory release replace them)."""
    scheduler: Scheduler
    sampler: Sampler
    counters: LoopCounters
    grammar: Constraints
    device: torch.device

    @property
    def runner(self) -> Any: ...


class Phase(Enum):
    PREFILL = "prefill"      # reqs: the prompts the step completed (maybe none); tokens: their first samples
    DECODE = "decode"        # sampled on the device; tokens are the next decode step's inputs
    DEFERRED = "deferred"    # forward launched; sampling waits for the previous step's tokens (grammar masks)
    QUEUED = "queued"        # sampled behind a device-side wait for the mask helpers, whose answers the
                             # host has still to take (Constraints.settle)


@dataclass(frozen=True)
class InFlight:
    """A launched step whose samples are read later."""
    phase: Phase
    reqs: list[Request]
    tokens: torch.Tensor | None = None    # sampled ids on the device, one per request
    host: HostCopy | None = None          # the same ids (and logprob tensors) on their way to the host
    logprobs: bool = False                # host holds logprob tensors after the ids
    logits: torch.Tensor | None = None    # DEFERRED: what the sampling will read
    ticket: MaskTicket | None = None      # QUEUED: the helpers' request whose answers are to be taken


@dataclass
class Sampled:
    """Tokens sampled for requests, read on the host, to be taken into them."""
    reqs: list[Request]
    tokens: list[int]
    logprobs: list[Logprobs]
    mirrored: bool = False                # the grammar helpers were sent these tokens already
    outgrown: Request | None = None       # a lone request the KV pool can no longer hold
    pooled: list[Request] = field(default_factory=list)   # pooling requests done (their result is set)


class Executor:
    def __init__(self, loop: LoopParts, eos_ids: set[int]) -> None:
        # A weak reference: the engine owns its executor, and a cycle between them would keep a dropped
        # engine's device memory (weights, KV pool) until the cyclic collector happens to run.
        self.loop = cast(LoopParts, weakref.proxy(loop))
        self.eos_ids = eos_ids

    # ---- overlapped: launch now, collect with the next step ----
    def launch(self, plan: ScheduledBatch, prev: InFlight | None) -> InFlight | None:
        """Launch a step whose samples stay on the device; None if a decode step found no KV slots. After
        a decode step, its samples are this one's inputs and its grammar rows wait for their masks."""
        if not plan.is_decode:
            return self._launch_prefill(plan)
        inputs = None
        if prev is not None:
            assert prev.tokens is not None
            if len(plan.reqs) == len(prev.reqs) and all(a is b for a, b in zip(plan.reqs, prev.reqs)):
                inputs = prev.tokens
            else:
                where = {id(r): i for i, r in enumerate(prev.reqs)}
                inputs = prev.tokens[to_device([where[id(r)] for r in plan.reqs], torch.int64, self.loop.device)]
        launched = self._launch_decode(plan, inputs, defer=prev is not None)
        if prev is not None:
            self.loop.counters.overlapped_steps += 1
        return launched

    def _launch_prefill(self, plan: ScheduledBatch) -> InFlight:
        loop = self.loop
        result = self._forward(plan)
        for req in plan.reqs:
            loop.counters.prompt_tokens += req.chunk_len
        loop.scheduler.after_prefill(plan)
        loop.counters.overlapped_prefills += 1
        reqs = result.sampling_reqs
        if not reqs:
            return InFlight(Phase.PREFILL, reqs)
        tokens = loop.sampler.sample_tensor(result.next_logits, [r.decode_row or _decode_row(r) for r in reqs])
        return InFlight(Phase.PREFILL, reqs, tokens, HostCopy([tokens]))

    def _launch_decode(self, plan: ScheduledBatch, inputs: torch.Tensor | None, defer: bool) -> InFlight | None:
        slots = self.loop.scheduler.alloc_decode_slots(plan)
        if slots is None:
            return None
        result = self._forward(plan, slots, inputs)
        for req in plan.reqs:
            req.kv_len += 1
        if defer and self.loop.grammar.any(plan.reqs):
            return InFlight(Phase.DEFERRED, plan.reqs, logits=result.next_logits)
        return self._sample(plan.reqs, result.next_logits)

    def _sample(self, reqs: list[Request], logits: torch.Tensor, ticket: MaskTicket | None = None) -> InFlight:
        loop = self.loop
        # Overlapped steps only run rows without penalties or bans, so each request's row never changes.
        rows = [r.decode_row or _decode_row(r) for r in reqs]
        ks = [r.params.logprobs for r in reqs]
        bitmask = loop.grammar.masks(reqs, logits.device, ticket)
        # The sampling kernel can skip masked tokens itself (no launch, no pass over the logits);
        # log-probabilities and the other sampling paths read masked logits.
        if bitmask is not None and (any(k is not None for k in ks) or not loop.sampler.fuses_bitmask(rows)
                                    or bitmask.shape[1] * 32 < logits.shape[1]):
            loop.grammar.apply(logits, bitmask)
            bitmask = None
        tokens = loop.sampler.sample_tensor(logits, rows, bitmask)
        lps = None
        if any(k is not None for k in ks):
            lps = logprob_tensors(logprob_logits(logits, [r.params for r in reqs]), tokens,
                                  max(k or 0 for k in ks))
        return InFlight(Phase.DECODE, reqs, tokens, HostCopy([tokens, *(lps or ())]), lps is not None)

    def collect(self, prev: InFlight, nxt: InFlight | None) -> tuple[Sampled, InFlight | None]:
        """Read prev's samples (the device may be running nxt meanwhile). If nxt's grammar rows wait for
        their masks, the helpers start on them now, before the host takes prev's tokens, and nxt's sampling
        is queued behind their answers where the device can wait for them."""
        if prev.host is None:
            return Sampled([], [], []), nxt
        host = self._read_host(prev.host)
        tokens = host[0].tolist()
        lps: list[Logprobs] = [None] * len(prev.reqs)
        if prev.phase is Phase.PREFILL:
            return Sampled(prev.reqs, tokens, lps), nxt
        ticket = None
        if nxt is not None and nxt.phase is Phase.DEFERRED:
            ticket = self.loop.grammar.ask_helpers(prev.reqs, tokens, nxt.reqs)
            if ticket is not None:
                nxt = self._sample_when_answered(nxt, ticket)
        if prev.logprobs:
            lps = list(logprob_dicts(tuple(host[1:]), [r.params.logprobs or 0 for r in prev.reqs]))
        return Sampled(prev.reqs, tokens, lps, mirrored=ticket is not None), nxt

    def _sample_when_answered(self, nxt: InFlight, ticket: MaskTicket) -> InFlight:
        """Queue nxt's sampling at once, its masks copied to the device once the helpers have written them
        (the device waits for their answers): the host's accept loop then runs beside the helpers and the
        device, not before the sampling. Where that can't be (rows the engine fills, logprobs, rows the
        fused kernel can't take), sampling waits for the loop (finish)."""
        loop, reqs, logits = self.loop, nxt.reqs, nxt.logits
        assert logits is not None
        rows = [r.decode_row or _decode_row(r) for r in reqs]
        if any(r.params.logprobs is not None for r in reqs) or not loop.sampler.fuses_bitmask(rows):
            return replace(nxt, ticket=ticket)
        bitmask = loop.grammar.masks_when_answered(ticket, reqs, logits)
        if bitmask is None:
            return replace(nxt, ticket=ticket)
        tokens = loop.sampler.sample_tensor(logits, rows, bitmask)
        return InFlight(Phase.QUEUED, reqs, tokens, HostCopy([tokens]), ticket=ticket)

    def finish(self, nxt: InFlight | None) -> InFlight | None:
        """Once the previous step's tokens are taken: sample a deferred step (the grammars have seen every
        token now), or take the helpers' answers for a queued one."""
        if nxt is None:
            return None
        if nxt.phase is Phase.DEFERRED:
            assert nxt.logits is not None
            return self._sample(nxt.reqs, nxt.logits, nxt.ticket)
        if nxt.phase is Phase.QUEUED:
            assert nxt.ticket is not None
            self.loop.grammar.settle(nxt.ticket, nxt.reqs)
            return replace(nxt, phase=Phase.DECODE, ticket=None)
        return nxt

    def _read_host(self, host: HostCopy) -> list[torch.Tensor]:
        """An overlapped step's samples; the time spent waiting for the device is counted, so that a
        run can tell a host-bound loop (little waiting) from a device-bound one."""
        start = time.perf_counter()
        out = host.get()
        self.loop.counters.device_wait_s += time.perf_counter() - start
        return out

    # ---- synchronous: launch and collect at once ----
    def run(self, plan: ScheduledBatch) -> Sampled:
        """Run a step and read its samples before returning."""
        loop = self.loop
        decode_slots = None
        if plan.is_decode:
            decode_slots = loop.scheduler.alloc_decode_slots(plan)
            if decode_slots is None:   # a lone request has outgrown the whole pool
                return Sampled([], [], [], outgrown=plan.reqs[0])
        result = self._forward(plan, decode_slots)
        if plan.is_decode:
            for req in plan.reqs:
                req.kv_len += 1
        else:
            for req in plan.reqs:
                if id(req) in result.prompt_logits:
                    _add_prompt_logprobs(req, result.prompt_logits[id(req)])
                loop.counters.prompt_tokens += req.chunk_len
            loop.scheduler.after_prefill(plan)
        reqs = result.sampling_reqs
        if not reqs:
            return Sampled([], [], [], pooled=result.pooled)
        rows = []
        for req in reqs:
            banned: list[int] = []
            if len(req.output_ids) < req.params.min_tokens:
                banned = sorted((set() if req.params.ignore_eos else self.eos_ids)
                                | set(req.params.stop_token_ids or ()))
            rows.append(SampleRow(req.params, req.generator, req.prompt_ids, req.output_ids, banned))
        logits = result.next_logits
        bitmask = loop.grammar.masks(reqs, logits.device)
        if bitmask is not None:
            loop.grammar.apply(logits, bitmask)
        out = loop.sampler(logits, rows)
        return Sampled(reqs, out.token_ids, out.logprobs, pooled=result.pooled)

    def _forward(self, plan: ScheduledBatch, decode_slots: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None) -> Any:
        counters = self.loop.counters
        if plan.is_decode:
            counters.decode_steps += 1
        else:
            counters.prefill_steps += 1
        return self.loop.runner.forward(plan, decode_slots, input_ids)


def _decode_row(req: Request) -> SampleRow:
    req.decode_row = SampleRow(req.params, req.generator, req.prompt_ids, req.output_ids)
    return req.decode_row


def _add_prompt_logprobs(req: Request, logits: torch.Tensor) -> None:
    start, n = req.kv_len, req.chunk_len
    if req.prompt_logprobs is None:
        req.prompt_logprobs = [None]          # nothing predicts the first token
    targets = req.prompt_ids[start + 1:start + n + 1]
    rows = logits[:len(targets)]
    k = req.params.prompt_logprobs
    if len(targets) and k is not None:
        req.prompt_logprobs.extend(prompt_logprobs(rows, targets, k))
