"""The engine: requests in, RequestOutputs out. Each step plans a batch (scheduler), launches it on the
device (executor), collects the previous in-flight step's samples, takes them into their requests
(grammar, stops) and returns the outputs of the request groups that changed."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch

from rlserve.config import EngineConfig
from rlserve.engine import lifecycle, pause
from rlserve.engine import weights as weight_api
from rlserve.engine.build import build
from rlserve.engine.detokenizer import IncrementalDetokenizer
from rlserve.engine.errors import QueueFullError
from rlserve.engine.executor import Executor, InFlight, Phase, Sampled
from rlserve.engine.grammar import Constraints
from rlserve.engine.grammar.constraints import REJECTED
from rlserve.engine.lifecycle import MEMORY_TAGS, ReleasedRunner, Weights
from rlserve.engine.pooling import PoolingParams, check_request
from rlserve.engine.request import Request
from rlserve.engine.runner import ModelRunner
from rlserve.engine.sampler import Sampler
from rlserve.engine.scheduler import ScheduledBatch, Scheduler
from rlserve.engine.status import EngineStatus, LoopCounters
from rlserve.engine.stops import Group, output_of, stop_of
from rlserve.outputs import RequestOutput
from rlserve.sampling import SamplingParams

log = logging.getLogger("rlserve")


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        parts = build(config)     # construction policy: device, dtypes, model and kernels, KV budget, runner
        self.device, self.dtype, self.kv_dtype = parts.device, parts.dtype, parts.kv_dtype
        self.model_config, self.tokenizer, self.model = parts.model_config, parts.tokenizer, parts.model
        self.max_model_len, self.eos_ids, self.overlap = parts.max_model_len, parts.eos_ids, parts.overlap
        self.allocator, self.kv_pool, self.table = parts.allocator, parts.kv_pool, parts.table
        self.pad_row, self.tree, self.memory = parts.pad_row, parts.tree, parts.memory
        self.memory_saver = parts.memory_saver
        self.runner: ModelRunner | ReleasedRunner = parts.runner
        self.weight_version = "default"
        self.scheduler = Scheduler(parts.scheduler, self.memory)
        self.sampler = Sampler(seed=config.seed, device=self.device)
        self.groups: dict[str, Group] = {}
        self._in_flight: InFlight | None = None
        self.pause_mode: str | None = None          # pause.py: None while generating
        self.pending_outputs: dict[str, RequestOutput] = {}   # for the next step() (pausing produced them)
        # Structured output; its compiler and mask helper processes start with the first constrained request.
        self.grammar = Constraints(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_ids),
                                   helpers=parts.grammar_helpers, helper_rows=config.scheduler.max_running_requests,
                                   pin=self.device.type == "cuda")
        self.counters = LoopCounters()
        self.executor = Executor(self, self.eos_ids)
        self._arrival = itertools.count()
        self._auto_rid = itertools.count()
        # Outputs own copies of the growing token and logprob lists. A caller that reads each output before
        # the next step and keeps only slices (the server's engine loop) may turn this off: copying every
        # running request's whole list on every step is the largest host cost of a step at large batch.
        self.snapshot_outputs = True
        if config.warmup and self.device.type == "cuda":
            self.warm_up()

    # ---- requests ----
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, rid: str | None = None,
                    prompt: str | None = None, pooling: PoolingParams | None = None) -> str:
        """Validate and queue a request. Raises ValueError for bad input; the engine is unaffected. With
        `pooling`, the request is prefilled and pooled (an embedding or scores: pooling.py), not decoded."""
        self._check_resident()
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        rid = str(next(self._auto_rid)) if rid is None else rid
        if rid in self.groups:
            raise ValueError(f"request id {rid!r} is already in use")
        prompt_ids = self._validate_prompt(prompt_ids)
        pooling = check_request(self.model_config, self.config.model, self.config.pooling, pooling, params.n)
        room = self.max_model_len - len(prompt_ids)
        max_new = 0 if pooling is not None else min(params.max_tokens or room, room)
        limit = self.config.scheduler.max_waiting_requests
        if limit is not None and self.scheduler.num_waiting() >= limit:
            raise QueueFullError(f"{limit} requests are waiting already; retry later")
        compiled = self.grammar.compile(params)
        group = Group(rid, prompt, prompt_ids)
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = self.sampler.make_generator(params.seed + i)
            detok = None
            if self.tokenizer is not None and pooling is None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                               skip_special_tokens=params.skip_special_tokens,
                                               stop_strings=params.stop_strings,
                                               include_stop_str_in_output=params.include_stop_str_in_output)
            req = Request(rid=rid if params.n == 1 else f"{rid}-{i}", group=rid, index=i,
                          prompt_ids=prompt_ids, params=params, max_new_tokens=max_new,
                          arrival=next(self._arrival), generator=gen, detokenizer=detok, prompt=prompt,
                          logprobs=[] if params.logprobs is not None else None,
                          weight_version_spans=((0, self.weight_version),), pooling=pooling)
            if compiled is not None:
                self.grammar.register(req, compiled)
            group.reqs.append(req)
        self.groups[rid] = group
        for req in group.reqs:
            self.scheduler.add(req)
        return rid

    def _validate_prompt(self, prompt_ids: object) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        # map/min/max run in C: a server adds each prompt here, ~0.15 ms a 2k prompt as Python loops.
        if not isinstance(prompt_ids, (list, tuple)) or not all(map(isinstance, prompt_ids, itertools.repeat(int))):
            raise ValueError("prompt token ids must be a list of integers")
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is required")
        vocab = self.model_config.vocab_size
        lo, hi = min(prompt_ids), max(prompt_ids)
        if lo < 0 or hi >= vocab:
            bad = next(t for t in prompt_ids if not 0 <= t < vocab)
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab}")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens but the context length is "
                             f"{self.max_model_len} (room is needed for at least one new token)")
        if len(prompt_ids) + 1 > self.allocator.size:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens but the KV pool holds {self.allocator.size}")
        return prompt_ids

    def abort(self, rid: str) -> RequestOutput | None:
        """Abort a request at any moment; its memory is freed at once. Unknown ids return None."""
        group = self.groups.pop(rid, None)
        if group is None:
            return None
        for req in group.reqs:
            if not req.finished:
                req.finish_reason = "abort"
                self.scheduler.remove(req)
                self.grammar.release(req)
        self.scheduler.forget_group(rid)
        return output_of(group, self.snapshot_outputs)

    def has_unfinished(self) -> bool:
        """Requests not finished, or finished ones whose final outputs the next step() returns."""
        return bool(self.groups or self.pending_outputs)

    @property
    def in_flight(self) -> bool:
        """A step is running on the device whose results the next step() reads (overlapped scheduling):
        a step that returned nothing may still have launched work."""
        return self._in_flight is not None

    # ---- the step: schedule → launch → collect → sample → stop → outputs ----
    def step(self, emit_unfinished: bool = True) -> list[RequestOutput]:
        """Run one scheduler step; return outputs of every request group that changed (only the
        finished ones with emit_unfinished=False, which saves copying growing outputs each step)."""
        prev, self._in_flight = self._in_flight, None
        plan = self._schedule(prev)
        launched = None
        if plan is not None and self.overlap and plan.may_overlap:
            launched = self.executor.launch(plan, prev)     # on the device behind prev, which it may read
        changed: dict[str, Group] = {}
        if prev is not None:
            sampled, launched = self.executor.collect(prev, launched)
            self._take(sampled, emit_unfinished, changed)
            launched = self.executor.finish(launched)       # its sampling, if it waited for these tokens
        self._in_flight = launched
        if plan is not None and launched is None:           # synchronous: launch and collect at once
            sampled = self.executor.run(plan)
            self._abort_rejected(changed)       # before their tokens: their matchers rejected earlier ones
            self._take(sampled, emit_unfinished, changed)
        return pause.take(self, self._emit(changed))

    def _schedule(self, prev: InFlight | None) -> ScheduledBatch | None:
        """The next step's plan. With a step in flight, only one that can't depend on its tokens: after a
        prefill, another prefill; after a decode step, the next decode step, when nothing may change it."""
        if self.pause_mode is not None:
            return None
        if prev is None:
            return self.scheduler.schedule()
        if prev.phase is Phase.PREFILL:
            return self.scheduler.schedule_prefill()
        return self.scheduler.schedule_ahead()

    def _take(self, sampled: Sampled, emit_unfinished: bool, changed: dict[str, Group]) -> None:
        """Append each request's sampled token and check its stops; a request that finished meanwhile
        (stopped a step earlier, aborted) drops its token."""
        if sampled.outgrown is not None:
            self._finish(sampled.outgrown, "length")
            changed[sampled.outgrown.group] = self.groups[sampled.outgrown.group]
        for req in sampled.pooled:           # pooled at the end of their prefill: nothing to decode
            self._finish(req, "stop")
            changed[req.group] = self.groups[req.group]
        ends = self.grammar.accept(sampled.reqs, sampled.tokens, sampled.mirrored)
        counters, eos_ids, max_len = self.counters, self.eos_ids, self.max_model_len
        for req, token, lp in zip(sampled.reqs, sampled.tokens, sampled.logprobs):
            if req.finished:
                continue
            req.output_ids.append(token)
            if req.logprobs is not None:
                req.logprobs.append(lp)  # type: ignore[arg-type]  # a row that asks for logprobs gets them
            counters.generation_tokens += 1
            end = ends.get(req) if ends else None
            if end is None:
                end = stop_of(req, token, eos_ids, max_len)
            if end is not None:
                self._finish(req, *end)
            if emit_unfinished or req.finished:
                changed[req.group] = self.groups[req.group]

    def _finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        req.finish_reason, req.stop_reason = reason, stop_reason
        if req.detokenizer is not None and not req.detokenizer.stopped:
            req.detokenizer.finish()
        self.scheduler.remove(req)
        self.grammar.release(req)

    def _abort_rejected(self, changed: dict[str, Group]) -> None:
        """End the requests whose matcher, catching up while masks were filled, rejected a token."""
        for req in self.grammar.take_rejected():
            if not req.finished:
                self._finish(req, *REJECTED)
            if req.group in self.groups:
                changed.setdefault(req.group, self.groups[req.group])

    def _emit(self, changed: dict[str, Group]) -> list[RequestOutput]:
        self._abort_rejected(changed)
        outs = []
        for rid, group in changed.items():
            out = output_of(group, self.snapshot_outputs)
            outs.append(out)
            if out.finished:
                self.groups.pop(rid, None)
                self.scheduler.forget_group(rid)
                self.counters.cached_tokens += out.cached_tokens
        return outs

    # ---- pausing (pause.py: what each mode does to the requests there) ----
    def pause_generation(self, mode: str = "abort") -> int:
        """Stop stepping: "abort" | "retract" | "in_place". Returns how many requests the mode affected."""
        return pause.pause(self, mode)

    def continue_generation(self) -> None:
        pause.resume(self)

    @property
    def paused(self) -> bool:
        return self.pause_mode is not None

    # ---- weights (weights.py), memory and warm-up (lifecycle.py: what each needs and leaves behind) ----
    def update_weights(self, weights: Weights, weight_version: str | None = None) -> int:
        """Copy new parameters in place, all or nothing (ValueError changes nothing); the prefix cache is
        dropped. Needs an idle or paused engine. Returns how many tensors were updated."""
        return weight_api.update_weights(self, weights, weight_version)

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 weight_version: str | None = None) -> int:
        """Load a safetensors directory or .gguf file into the model, all or nothing."""
        return weight_api.update_weights_from_disk(self, model_path, load_format, weight_version)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        """An HF-named parameter's first truncate_size rows as nested lists of floats."""
        return weight_api.get_weights_by_name(self, name, truncate_size)

    def set_weight_version(self, version: str) -> None:
        weight_api.set_weight_version(self, version)

    def release_memory(self, tags: str | Iterable[str] = MEMORY_TAGS) -> None:
        """Free the KV pool ("kv_cache") and/or move the weights to host memory ("weights")."""
        lifecycle.release_memory(self, tags)

    def resume_memory(self, tags: str | Iterable[str] = MEMORY_TAGS) -> None:
        lifecycle.resume_memory(self, tags)

    def released_memory(self) -> set[str]:
        """The memory tags released now (empty while the engine can generate)."""
        return lifecycle.released(self)

    def _check_resident(self) -> None:
        lifecycle.check_resident(self)

    def warm_up(self) -> None:
        """Run each prefill size once (CUDA loads kernels on first use), then forget it: counters, request ids,
        the sampler's seed stream, the scheduler and the prefix cache are as constructed."""
        lifecycle.warm_up(self, self.scheduler.cfg.chunked_prefill_size or 2048)
        self.counters = LoopCounters()
        self.scheduler = Scheduler(self.scheduler.cfg, self.memory)   # its admission estimate adapts per step
        self.sampler = Sampler(seed=self.config.seed, device=self.device)
        self._arrival = itertools.count()
        self._auto_rid = itertools.count()

    # ---- state ----
    def status(self) -> EngineStatus:
        """The engine's state now as one typed value: what everything outside the engine reads."""
        sched, tree, alloc = self.scheduler, self.tree, self.allocator
        return EngineStatus(
            running=len(sched.running) + (sched.chunked is not None), waiting=len(sched.waiting),
            chunked=sched.chunked is not None, retractions=sched.num_retractions, kv_total=alloc.size,
            kv_free=alloc.available(), kv_cached=tree.total_size() if tree else 0,
            kv_evictable=tree.evictable_size() if tree else 0, kv_leaked=self.kv_leaked(),
            weight_version=self.weight_version, device=str(self.device), dtype=_name(self.dtype),
            kv_dtype=_name(self.kv_dtype), max_model_len=self.max_model_len, in_flight=self.in_flight,
            released=tuple(sorted(self.released_memory())), paused=self.pause_mode,
            counters=replace(self.counters))

    def flush_cache(self) -> bool:
        """Drop the whole prefix cache; refused (False) while requests hold parts of it."""
        return self.tree.flush() if self.tree is not None else True

    def kv_leaked(self) -> int:
        """KV slots owned by nobody: 0 unless there is a bug."""
        return self.memory.leaked(self.scheduler.live())

    def rng_state(self) -> dict[str, Any]:
        """The random state of unseeded sampling (a training run checkpoints it to resume exactly)."""
        return self.sampler.get_state()

    def set_rng_state(self, state: dict[str, Any] | torch.Tensor) -> None:
        self.sampler.set_state(state)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
