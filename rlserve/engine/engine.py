"""The step loop: schedule → forward → sample → detokenize/stop → outputs."""
from __future__ import annotations

import itertools
import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rlserve.config import EngineConfig, ModelConfig, parse_dtype
from rlserve.engine.cache import RadixCache, ReqToTokenPool, TokenAllocator
from rlserve.kv_pool import FP8_DTYPE, KVPool
from rlserve.engine.detokenizer import IncrementalDetokenizer
from rlserve.engine.grammar import GrammarBackend, GrammarSpec
from rlserve.engine.memory import RequestMemory
from rlserve.engine.request import Request
from rlserve.engine.runner import ModelRunner
from rlserve.engine.sampler import (Sampler, SampleRow, has_penalties, logprob_dicts, logprob_logits,
                                    logprob_tensors, prompt_logprobs)
from rlserve.engine.scheduler import Scheduler
from rlserve.engine.transfer import HostCopy, to_device
from rlserve.layers.attention import create_backend
from rlserve.layers.fused import Kernels
from rlserve.models.loader import load_tokenizer, resolve_model
from rlserve.models.llama import LlamaForCausalLM
from rlserve.outputs import CompletionOutput, RequestOutput
from rlserve.sampling import SamplingParams

log = logging.getLogger("rlserve")
DEFAULT_MAX_MODEL_LEN = 32768   # keeps the request-to-token table small for 128k-context models


@dataclass
class _Pending:
    reqs: list[Request]
    tokens: torch.Tensor | None   # sampled ids on the device, one per request (next step's inputs)
    host: HostCopy | None         # the same ids (and logprob tensors) on their way to the host
    has_logprobs: bool
    # Set while sampling waits for the host: grammar masks need the previous step's tokens accepted.
    logits: torch.Tensor | None = None
    # The rows whose masks the grammar backend's helper process is filling (their matchers' keys, None
    # for the engine's own rows); None when the engine fills them all.
    helper_rows: list[int | None] | None = None
    # Sampled already, behind a wait on the device for the helpers' answers, which the host has still
    # to take (GrammarBackend.confirm_masks).
    unconfirmed: bool = False
    # A prefill step: reqs are the prompts it completed (possibly none), tokens their first samples.
    prefill: bool = False


@dataclass
class _Group:
    rid: str
    prompt: str | None
    prompt_ids: list[int]
    reqs: list[Request] = field(default_factory=list)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_DTYPE
    raise ValueError(f"unknown kv_cache_dtype {name!r}; choose auto or fp8_e4m3")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def resolve_compile(compile: bool | str, device: torch.device) -> bool | str:
    """What `compile` means on this device: "triton" (Triton kernels for the elementwise chains, torch.compile
    for shapes they don't serve), True (torch.compile only) or False (eager). "auto" is "triton" on CUDA
    with Triton installed (faster than inductor's kernels and cheaper on the host: docs/benchmarks.md,
    "Triton elementwise kernels by default"), torch.compile on CUDA without it, eager elsewhere."""
    if compile != "auto":
        return compile
    if device.type != "cuda":
        return False
    from rlserve.layers.triton_support import HAS_TRITON
    return "triton" if HAS_TRITON else True


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        dtype = torch.float32 if config.dtype == "auto" and self.device.type == "cpu" else (
            torch.bfloat16 if config.dtype == "auto" else parse_dtype(config.dtype))
        self.dtype = dtype
        source = resolve_model(config.model, config.load_format)
        self.model_config = cfg = ModelConfig.from_hf(source.hf_config)
        self.tokenizer = load_tokenizer(config.tokenizer or source.tokenizer_dir)
        if config.compile not in (True, False, "auto", "triton"):
            raise ValueError(f"compile must be True, False, 'auto' or 'triton', got {config.compile!r}")
        elementwise = resolve_compile(config.compile, self.device)
        if elementwise:
            Kernels.compile(triton_elementwise=elementwise == "triton")
        if config.max_model_len is not None and not 1 < config.max_model_len <= cfg.max_position:
            raise ValueError(f"max_model_len must be in [2, {cfg.max_position}] for this model, "
                             f"got {config.max_model_len}")
        self.max_model_len = min(cfg.max_position, config.max_model_len or DEFAULT_MAX_MODEL_LEN)
        self.model = self._build_model(cfg, source, dtype)
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype)
        num_tokens = self._kv_budget_tokens(cfg, self.kv_dtype)
        self.allocator = TokenAllocator(num_tokens, self.device)
        self.kv_pool = KVPool(cfg.num_layers, num_tokens + 1, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype,
                              self.device)
        self.table = ReqToTokenPool(config.scheduler.max_running_requests + 3, self.max_model_len + 1, self.device)
        self.pad_row = self.table.alloc()      # stays all zeros: padded graph rows point at KV slot 0
        self.tree = RadixCache(self.allocator) if config.cache.enable_radix_cache else None
        self.memory = RequestMemory(self.allocator, self.table, self.tree)
        self.model.attn_backend = create_backend(config.attention_backend, self.kv_pool, cfg, self.device)
        self.runner = ModelRunner(self.model, self.table, self.device)
        max_members = getattr(self.model.attn_backend, "cascade_max_members", 0)
        if config.cascade_attention and self.tree is not None and max_members:
            self.runner.enable_cascade(max_members, KVPool.bytes_per_token(
                cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype))
        # The torch backend sizes its masks on the host per batch, so only the triton one is captured.
        graphable = type(self.model.attn_backend).__name__ == "TritonAttentionBackend"
        if self.device.type == "cuda" and config.cuda_graph and graphable:
            # By default every batch the scheduler can form replays a graph (an eager step costs ~1.5× one).
            max_running = config.scheduler.max_running_requests
            self.runner.capture_cuda_graphs(self.pad_row, min(config.cuda_graph_max_bs or max_running, max_running))
        sched_cfg = config.scheduler
        if sched_cfg.chunked_prefill_size is None:
            sched_cfg = replace(sched_cfg, chunked_prefill_size=8192 if self.device.type == "cuda" else 2048)
        self.scheduler = Scheduler(sched_cfg, self.memory)
        self.sampler = Sampler(seed=config.seed, device=self.device)
        self.groups: dict[str, _Group] = {}
        overlap = config.overlap_schedule
        self.overlap = self.device.type == "cuda" if overlap == "auto" else bool(overlap)
        self._pending: _Pending | None = None
        self._grammar: GrammarBackend | None = None
        self._late_finished: list[Request] = []    # aborted outside a step's accept loop; emitted with it
        # How many helper processes fill grammar masks beside the loop's own work in overlapped steps
        # (see grammar_worker); read when the first constrained request arrives. Each keeps a core busy
        # while constrained requests run: one per four cores, at most three (two measured slower, four
        # no faster; docs/benchmarks.md).
        self.grammar_helpers = max(1, min(3, (os.cpu_count() or 1) // 4)) if self.overlap else 0
        self._arrival = itertools.count()
        self._auto_rid = itertools.count()
        # Outputs own copies of the growing token and logprob lists. A caller that reads each output before
        # the next step and keeps only slices (the server's engine loop) may turn this off: copying every
        # running request's whole list on every step is the largest host cost of a step at large batch.
        self.snapshot_outputs = True
        self.stats = self._zero_stats()
        if config.warmup and self.device.type == "cuda":
            self.warm_up()

    # ---- construction ----
    def _build_model(self, cfg: ModelConfig, source, dtype: torch.dtype) -> LlamaForCausalLM:
        torch.manual_seed(self.config.seed)
        with torch.device(self.device):
            model = LlamaForCausalLM(cfg)
        if source.load_format == "dummy":
            model.init_dummy(self.config.seed)
        else:
            from rlserve.models.loader import iter_safetensors
            model.load_weights(iter_safetensors(source.model_dir))
        model = model.to(dtype).eval()
        model.fp32_logits = self.config.fp32_logits
        model.stack_projections()
        return model

    def _kv_budget_tokens(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        per_token = KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
        cache = self.config.cache
        if cache.max_total_tokens is not None:
            return cache.max_total_tokens
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * cache.gpu_memory_fraction) // per_token
        return max(cache.kv_cache_bytes // per_token, 1)

    # ---- requests ----
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, rid: str | None = None,
                    prompt: str | None = None) -> str:
        """Validate and queue a request. Raises ValueError for bad input; the engine is unaffected."""
        self._check_resident()
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        rid = str(next(self._auto_rid)) if rid is None else rid
        if rid in self.groups:
            raise ValueError(f"request id {rid!r} is already in use")
        prompt_ids = self._validate_prompt(prompt_ids)
        room = self.max_model_len - len(prompt_ids)
        max_new = min(params.max_tokens or room, room)
        compiled = self._compile_grammar(params)
        group = _Group(rid, prompt, prompt_ids)
        for i in range(params.n):
            matcher = key = None
            if compiled is not None:
                matcher, key = self._grammar.matcher(GrammarSpec.from_params(params), compiled)
            gen = None
            if params.seed is not None:
                gen = self.sampler.make_generator(params.seed + i)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                               skip_special_tokens=params.skip_special_tokens,
                                               stop_strings=params.stop_strings,
                                               include_stop_str_in_output=params.include_stop_str_in_output)
            req = Request(rid=rid if params.n == 1 else f"{rid}-{i}", group=rid, index=i,
                          prompt_ids=prompt_ids, params=params, max_new_tokens=max_new,
                          arrival=next(self._arrival), generator=gen, detokenizer=detok, prompt=prompt,
                          logprobs=[] if params.logprobs is not None else None,
                          grammar=matcher, grammar_key=key)
            group.reqs.append(req)
        self.groups[rid] = group
        for req in group.reqs:
            self.scheduler.add(req)
        return rid

    def _compile_grammar(self, params: SamplingParams):
        spec = GrammarSpec.from_params(params)
        if spec is None:
            return None
        if self._grammar is None:
            if self.tokenizer is None:
                raise ValueError("structured output needs a tokenizer; this model has none")
            self._grammar = GrammarBackend(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_ids),
                                           helpers=self.grammar_helpers,
                                           helper_rows=self.config.scheduler.max_running_requests,
                                           pin=self.device.type == "cuda")
        return self._grammar.compile(spec)

    def _validate_prompt(self, prompt_ids) -> list[int]:
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
                self._release_grammar(req)
        self.scheduler.forget_group(rid)
        return self._output(group)

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    @property
    def in_flight(self) -> bool:
        """A step is running on the device whose results the next step() reads (overlapped scheduling):
        a step that returned nothing may still have launched work."""
        return self._pending is not None

    def _settle_in_flight(self) -> None:
        """Read an overlapped launch whose requests all finished (the engine is idle otherwise)."""
        while self._pending is not None:
            self.step()

    # ---- the step ----
    def step(self, emit_unfinished: bool = True) -> list[RequestOutput]:
        """Run one scheduler step; return outputs of every request group that changed (only the
        finished ones with emit_unfinished=False, which saves copying growing outputs each step)."""
        if self._pending is not None:
            return self._step_overlapped(emit_unfinished)
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if self.overlap and batch.is_decode and self._overlappable(batch.reqs):
            self._pending = self._launch_decode(batch, None)
            if self._pending is not None:
                return []
        if self.overlap and not batch.is_decode and self._prefill_overlappable(batch):
            self._pending = self._launch_prefill(batch)
            return []
        return self._step_sync(batch, emit_unfinished)

    # Overlapped decode: launch step N+1 on the device (its inputs are step N's samples, still on the
    # device), then read step N's tokens and do the host work (stops, detokenizing) while N+1 runs.
    # A request that stops at step N has had one extra token computed at N+1; it is dropped.
    def _overlappable(self, reqs: list[Request]) -> bool:
        return all(not has_penalties(r.params) and len(r.output_ids) >= r.params.min_tokens for r in reqs)

    # Overlapped prefill: a prefill step's first tokens are sampled on the device and read only once the
    # next prefill step is launched, so the host builds that step while the device runs this one. Rows
    # that need the host before sampling (grammar masks, logprobs, banned tokens, penalties) run in step.
    def _prefill_overlappable(self, batch) -> bool:
        return self._overlappable(batch.reqs) and all(
            r.grammar is None and r.params.logprobs is None and r.params.prompt_logprobs is None for r in batch.reqs)

    def _launch_prefill(self, batch) -> _Pending:
        result = self._forward(batch)
        for req in batch.reqs:
            self.stats["prompt_tokens"] += req.chunk_len
        self.scheduler.after_prefill(batch)
        pending = _Pending(result.sampling_reqs, None, None, False, prefill=True)
        self.stats["overlapped_prefills"] += 1
        if result.sampling_reqs:
            rows = [r.decode_row or self._decode_row(r) for r in result.sampling_reqs]
            pending.tokens = self.sampler.sample_tensor(result.next_logits, rows)
            pending.host = HostCopy([pending.tokens])
        return pending

    def _step_after_prefill(self, pending: _Pending, emit_unfinished: bool) -> list[RequestOutput]:
        """Launch the next prefill step (if the scheduler has one) before reading `pending`'s tokens."""
        nxt = self.scheduler.schedule_prefill()
        in_step = None
        if nxt is not None and self._prefill_overlappable(nxt):
            self._pending = self._launch_prefill(nxt)
        else:
            in_step = nxt
        changed: dict[str, _Group] = {}
        if pending.host is not None:
            self._accept_rows(pending.reqs, self._read_host(pending)[0].tolist(), [None] * len(pending.reqs),
                              emit_unfinished, changed)
        if in_step is not None:
            self._run_sync(in_step, emit_unfinished, changed)
        return self._emit(changed)

    def _launch_decode(self, batch, input_ids: torch.Tensor | None, defer_grammar: bool = False
                       ) -> _Pending | None:
        """Launch a decode forward. Rows under a grammar need a mask built from every token before
        this one; with defer_grammar the sampling waits (pending.logits) until the host has accepted
        the previous step's tokens, while the forward already runs on the device."""
        slots = self.scheduler.alloc_decode_slots(batch)
        if slots is None:
            return None
        result = self._forward(batch, slots, input_ids)
        for req in batch.reqs:
            req.kv_len += 1
        pending = _Pending(batch.reqs, None, None, False, logits=result.next_logits)
        if not (defer_grammar and any(r.grammar is not None for r in batch.reqs)):
            self._sample_pending(pending)
        return pending

    def _sample_pending(self, pending: _Pending) -> None:
        logits, reqs = pending.logits, pending.reqs
        pending.logits = None
        # Overlapped steps only run rows without penalties or bans, so each request's row never changes.
        rows = [r.decode_row or self._decode_row(r) for r in reqs]
        ks = [r.params.logprobs for r in reqs]
        bitmask = None
        if pending.helper_rows is not None:
            # The engine fills only rows it owns, whose matchers are always current.
            bitmask = self._grammar.requested_masks([None if r.finished else r.grammar for r in reqs],
                                                    pending.helper_rows, logits.device)
        if self._grammar is not None and bitmask is None:
            # A request that finished meanwhile keeps an unmasked row; its token is dropped anyway.
            bitmask = self._grammar.device_masks([None if r.finished else self._grammar_now(r) for r in reqs],
                                                 logits.device)
        # The sampling kernel can skip masked tokens itself (no launch, no pass over the logits);
        # log-probabilities and the other sampling paths read masked logits.
        if bitmask is not None and (any(k is not None for k in ks) or not self.sampler.fuses_bitmask(rows)
                                    or bitmask.shape[1] * 32 < logits.shape[1]):
            self._grammar.apply_bitmask(logits, bitmask)
            bitmask = None
        tokens = self.sampler.sample_tensor(logits, rows, bitmask)
        lps = None
        if any(k is not None for k in ks):
            lps = logprob_tensors(logprob_logits(logits, [r.params for r in reqs]), tokens,
                                  max(k or 0 for k in ks))
        pending.tokens, pending.host, pending.has_logprobs = tokens, HostCopy([tokens, *(lps or ())]), lps is not None

    @staticmethod
    def _decode_row(req: Request) -> SampleRow:
        req.decode_row = SampleRow(req.params, req.generator, req.prompt_ids, req.output_ids)
        return req.decode_row

    def _step_overlapped(self, emit_unfinished: bool) -> list[RequestOutput]:
        pending, sched = self._pending, self.scheduler
        self._pending = None
        if pending.prefill:
            return self._step_after_prefill(pending, emit_unfinished)
        # Chain another decode step unless the scheduler might prefill next: nothing is being chunked,
        # and either nothing waits or the running batch is full (waiting requests can't be admitted
        # before a running one finishes, which the host learns while this step's successor runs).
        full = len(sched.running) >= sched.cfg.max_running_requests
        chain = (sched.chunked is None and sched.running and (not sched.waiting or full)
                 and self.memory.available_tokens() >= 2 * len(sched.running)
                 and self._overlappable(sched.running))
        if chain:
            batch = sched.schedule()
            if len(batch.reqs) == len(pending.reqs) and all(a is b for a, b in zip(batch.reqs, pending.reqs)):
                inputs = pending.tokens
            else:
                where = {id(r): i for i, r in enumerate(pending.reqs)}
                inputs = pending.tokens[to_device([where[id(r)] for r in batch.reqs], torch.int64, self.device)]
            self._pending = self._launch_decode(batch, inputs, defer_grammar=True)
            self.stats["overlapped_steps"] += 1
        changed: dict[str, _Group] = {}
        host = self._read_host(pending)
        tokens = host[0].tolist()
        mirrored = self._request_masks(pending.reqs, tokens)
        if mirrored:
            self._sample_when_answered(self._pending)
        lps: list = [None] * len(pending.reqs)
        if pending.has_logprobs:
            lps = logprob_dicts(tuple(host[1:]), [r.params.logprobs or 0 for r in pending.reqs])
        self._accept_rows(pending.reqs, tokens, lps, emit_unfinished, changed, mirrored)
        nxt = self._pending
        if nxt is not None and nxt.logits is not None:
            self._sample_pending(nxt)     # the grammars have seen every token now
        elif nxt is not None and nxt.unconfirmed:
            nxt.unconfirmed = False
            self._grammar.confirm_masks(nxt.helper_rows, lambda: [self._grammar_now(r) for r in nxt.reqs])
        return self._emit(changed)

    def _accept_rows(self, reqs: list[Request], tokens: list[int], lps: list, emit_unfinished: bool,
                     changed: dict[str, _Group], mirrored: bool = False) -> None:
        """Take an overlapped step's tokens; a request that finished meanwhile (stop, abort) drops its own."""
        for req, token, lp in zip(reqs, tokens, lps):
            if req.finished:
                continue
            self._accept(req, token, lp, mirrored)
            if emit_unfinished or req.finished:
                changed[req.group] = self.groups[req.group]

    def _sample_when_answered(self, nxt: _Pending) -> None:
        """Queue the next step's sampling at once, its masks copied to the device once the helpers
        have written them (the device waits for their answers): the host's accept loop then runs
        beside the helpers and the device, not before the sampling. Where that can't be (rows the engine
        fills, logprobs, rows the fused kernel can't take), sampling waits for the loop as before."""
        reqs = nxt.reqs
        rows = [r.decode_row or self._decode_row(r) for r in reqs]
        if any(r.params.logprobs is not None for r in reqs) or not self.sampler.fuses_bitmask(rows):
            return
        logits = nxt.logits
        if self._grammar.helpers.bitmask.shape[1] * 32 < logits.shape[1]:
            return
        bitmask = self._grammar.masks_on_device_when_answered(
            nxt.helper_rows, [None if r.finished else r.grammar for r in reqs], logits.device)
        if bitmask is None:
            return
        nxt.logits = None
        nxt.tokens = self.sampler.sample_tensor(logits, rows, bitmask)
        nxt.host, nxt.has_logprobs, nxt.unconfirmed = HostCopy([nxt.tokens]), False, True

    def _request_masks(self, reqs: list[Request], tokens: list[int]) -> bool:
        """Before the rows' host work, start the grammar helpers on the next step's masks (they first
        advance their matchers by these tokens). True if they took the tokens."""
        nxt = self._pending
        if nxt is None or nxt.logits is None or self._grammar is None or not self._grammar.helper_ready():
            return False
        took = [None if r.finished else r.grammar_key for r in reqs]
        keys = [None if r.finished else r.grammar_key for r in nxt.reqs]
        if not self._grammar.request_masks(keys, took, tokens):
            return False
        nxt.helper_rows = keys
        return True

    def _read_host(self, pending: _Pending) -> list[torch.Tensor]:
        """An overlapped step's samples; the time spent waiting for the device is counted, so that a
        run can tell a host-bound loop (little waiting) from a device-bound one."""
        start = time.perf_counter()
        host = pending.host.get()
        self.stats["device_wait_s"] += time.perf_counter() - start
        return host

    def _forward(self, batch, decode_slots=None, input_ids: torch.Tensor | None = None):
        self.stats["decode_steps" if batch.is_decode else "prefill_steps"] += 1
        return self.runner.forward(batch, decode_slots, input_ids)

    def _step_sync(self, batch, emit_unfinished: bool) -> list[RequestOutput]:
        changed: dict[str, _Group] = {}
        self._run_sync(batch, emit_unfinished, changed)
        return self._emit(changed)

    def _run_sync(self, batch, emit_unfinished: bool, changed: dict[str, _Group]) -> None:
        """Run a step and take its samples before returning; the groups that changed go into `changed`."""
        decode_slots = None
        if batch.is_decode:
            decode_slots = self.scheduler.alloc_decode_slots(batch)
            if decode_slots is None:   # a lone request has outgrown the whole pool
                req = batch.reqs[0]
                self._finish(req, "length")
                changed[req.group] = self.groups[req.group]
                return
        result = self._forward(batch, decode_slots)
        if batch.is_decode:
            for req in batch.reqs:
                req.kv_len += 1
        else:
            for req in batch.reqs:
                if id(req) in result.prompt_logits:
                    self._add_prompt_logprobs(req, result.prompt_logits[id(req)])
                self.stats["prompt_tokens"] += req.chunk_len
            self.scheduler.after_prefill(batch)
        if result.sampling_reqs:
            self._sample(result.next_logits, result.sampling_reqs)
            for req in result.sampling_reqs:
                if emit_unfinished or req.finished:
                    changed[req.group] = self.groups[req.group]

    def _add_prompt_logprobs(self, req: Request, logits: torch.Tensor) -> None:
        start, n = req.kv_len, req.chunk_len
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]          # nothing predicts the first token
        targets = req.prompt_ids[start + 1:start + n + 1]
        rows = logits[:len(targets)]
        if len(targets):
            req.prompt_logprobs.extend(prompt_logprobs(rows, targets, req.params.prompt_logprobs))

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        rows = []
        for req in reqs:
            banned: list[int] = []
            if len(req.output_ids) < req.params.min_tokens:
                banned = sorted((set() if req.params.ignore_eos else self.eos_ids)
                                | set(req.params.stop_token_ids or ()))
            rows.append(SampleRow(req.params, req.generator, req.prompt_ids, req.output_ids, banned))
        if self._grammar is not None:
            self._grammar.apply_masks(logits, [self._grammar_now(r) for r in reqs])
        out = self.sampler(logits, rows)
        for req, token, lp in zip(reqs, out.token_ids, out.logprobs):
            if not req.finished:      # (a matcher catching up can abort its request)
                self._accept(req, token, lp)

    def _accept(self, req: Request, token: int, logprobs: dict[int, float] | None, mirrored: bool = False) -> None:
        """mirrored: the grammar helpers have been sent this token already."""
        req.output_ids.append(token)
        if req.logprobs is not None:
            req.logprobs.append(logprobs)
        self.stats["generation_tokens"] += 1
        self._check_stop(req, token, mirrored)

    def _check_stop(self, req: Request, token: int, mirrored: bool = False) -> None:
        p = req.params
        if req.grammar is not None:
            if mirrored and req.grammar_key is not None:
                # A helper's copy has taken the token and fills this row's masks, so the engine's
                # matcher can wait: it catches up (_grammar_now) only when it is read. A mask lets a
                # stop token through only where the grammar can end, so one completes the grammar.
                if token in self._grammar.stop_ids:
                    return self._finish(req, "stop")
                req.grammar_lag.append(token)
            else:
                if not mirrored:
                    self._grammar.accepted(req.grammar_key, token)
                matcher = self._grammar_now(req)     # after the helpers stopped, it may still lag
                if matcher is None:
                    return
                if not matcher.accept_token(token):
                    return self._finish(req, "abort", "grammar rejected the sampled token")
                # The grammar is complete once it takes a stop token (asked only then: a call a row adds up).
                if token in self._grammar.stop_ids and matcher.is_terminated():
                    return self._finish(req, "stop")
        if p.stop_token_ids and token in p.stop_token_ids:
            return self._finish(req, "stop", token)
        if not p.ignore_eos and token in self.eos_ids:
            return self._finish(req, "stop")
        if req.detokenizer is not None:
            req.detokenizer.append(token)
            if req.detokenizer.stopped:
                return self._finish(req, "stop", req.detokenizer.stop_string)
        if len(req.output_ids) >= req.max_new_tokens or req.num_tokens >= self.max_model_len:
            return self._finish(req, "length")

    def _grammar_now(self, req: Request) -> Any:
        """req's matcher with every accepted token taken (None if unconstrained or finished). Tokens
        the helper's copy took wait in grammar_lag; each was sampled under a mask from a matcher in
        the same state, so a rejection here means the two disagreed, and the request is aborted."""
        if req.grammar is None or req.finished:
            return None
        if req.grammar_lag:
            lag, req.grammar_lag = req.grammar_lag, []
            for token in lag:
                if not req.grammar.accept_token(token):
                    self._finish(req, "abort", "grammar rejected the sampled token")
                    self._late_finished.append(req)
                    return None
        return req.grammar

    def _finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        req.finish_reason, req.stop_reason = reason, stop_reason
        if req.detokenizer is not None and not req.detokenizer.stopped:
            req.detokenizer.finish()
        self.scheduler.remove(req)
        self._release_grammar(req)

    def _release_grammar(self, req: Request) -> None:
        if req.grammar_key is not None:
            self._grammar.release(req.grammar_key)
            req.grammar_key = None

    def _emit(self, changed: dict[str, _Group]) -> list[RequestOutput]:
        for req in self._late_finished:
            if req.group in self.groups:
                changed.setdefault(req.group, self.groups[req.group])
        self._late_finished.clear()
        outs = []
        for rid, group in changed.items():
            out = self._output(group)
            outs.append(out)
            if out.finished:
                self.groups.pop(rid, None)
                self.scheduler.forget_group(rid)
                self.stats["cached_tokens"] += out.cached_tokens
        return outs

    def _output(self, group: _Group) -> RequestOutput:
        copy = self.snapshot_outputs
        comps = [CompletionOutput(index=r.index, text=r.detokenizer.text if r.detokenizer else "",
                                  token_ids=list(r.output_ids) if copy else r.output_ids,
                                  logprobs=(list(r.logprobs) if copy else r.logprobs) if r.logprobs is not None else None,
                                  finish_reason=r.finish_reason, stop_reason=r.stop_reason)
                 for r in group.reqs]
        first = group.reqs[0]
        return RequestOutput(request_id=group.rid, prompt=group.prompt, prompt_token_ids=group.prompt_ids,
                             outputs=comps, prompt_logprobs=first.prompt_logprobs,
                             cached_tokens=first.cached_tokens)

    # ---- weights (RL) ----
    @torch.no_grad()
    def update_weights(self, weights) -> int:
        """Copy new parameters in place (a module with our parameter names, or (name, tensor) pairs);
        addresses don't change, so captured CUDA graphs stay valid. The prefix cache is dropped since
        its KV was computed with the old weights. Returns how many tensors were updated."""
        if self.has_unfinished():
            raise RuntimeError("update_weights needs an idle engine: finish or abort running requests first")
        self._settle_in_flight()
        pairs = weights.named_parameters() if isinstance(weights, torch.nn.Module) else weights
        params = dict(self.model.named_parameters())
        n = 0
        for name, tensor in pairs:
            if name not in params:
                raise KeyError(f"unknown parameter {name!r}")
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            n += 1
        self.flush_cache()
        return n

    # ---- maintenance ----
    @staticmethod
    def _zero_stats() -> dict[str, float]:
        return {"prompt_tokens": 0, "generation_tokens": 0, "cached_tokens": 0, "overlapped_steps": 0,
                "overlapped_prefills": 0, "prefill_steps": 0, "decode_steps": 0, "device_wait_s": 0.0}

    def warm_up(self) -> None:
        """Run one prefill of each power-of-two size up to the prefill chunk (one of them after a cached
        prefix), greedy and sampled, each with a decode step, then forget them: stats, request ids, the
        sampler's seed stream, the scheduler and the prefix cache are as before.

        CUDA loads a kernel the first time a process runs it, and cuBLAS picks a different GEMM kernel for
        each range of token counts; CUDA graph capture covers only the decode batches. Without eager
        loading, the offline benchmark's first run was 1-2 s slower than the next (docs/benchmarks.md, "The
        first timed run's extra second"); this pays for the prefill kernels at start instead.
        """
        if self.has_unfinished():
            raise RuntimeError("warm_up needs an idle engine")
        rng = random.Random(self.config.seed)
        vocab = min(self.model_config.vocab_size, 10_000)
        longest = min(self.scheduler.cfg.chunked_prefill_size or 2048, self.max_model_len - 2,
                      self.allocator.available() // 2)
        sizes = [n for n in (1 << i for i in range(4, 20)) if n <= longest][::-1]
        first: list[int] = []
        for i, n in enumerate(sizes):
            prompt = [rng.randrange(vocab) for _ in range(n)]
            if i == 1 and self.tree is not None:   # an extend over a cached prefix
                prompt = first[:n // 2] + prompt[n // 2:]
            first = first or prompt
            self.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True, temperature=i % 2 * 0.7),
                             rid=f"warm-up-{i}")
            while self.has_unfinished():
                self.step()
        self._settle_in_flight()
        self.flush_cache()
        self.stats = self._zero_stats()
        self.scheduler = Scheduler(self.scheduler.cfg, self.memory)   # its admission estimate adapts per step
        self.sampler = Sampler(seed=self.config.seed, device=self.device)
        self._arrival = itertools.count()
        self._auto_rid = itertools.count()

    def flush_cache(self) -> bool:
        """Drop the whole prefix cache; refused (False) while requests hold parts of it."""
        return self.tree.flush() if self.tree is not None else True

    def kv_leaked(self) -> int:
        return self.memory.leaked(self.scheduler.live())

    def kv_usage(self) -> float:
        return 1 - self.allocator.available() / self.allocator.size

    # Colocated RL: between rollouts the trainer takes back the memory the engine holds. Releasing the
    # KV cache frees the pool's storage; releasing the weights moves each parameter's data to pinned
    # host memory (param.data swap, so modules, parameters and optimizer state keep their identity).
    # Both change device addresses, and captured CUDA graphs bake addresses in: release drops the graphs
    # (their private memory pool goes too) and resume captures them again once KV and weights are both
    # back. Keeping addresses fixed instead would mean remapping physical pages under reserved virtual
    # addresses (the CUDA VMM API), which torch's allocator doesn't offer; re-capture is simple and exact.
    MEMORY_TAGS = ("kv_cache", "weights")

    def released_memory(self) -> set[str]:
        """The memory tags released now (empty while the engine can generate)."""
        return set(self.runner.tags) if isinstance(self.runner, _Released) else set()

    def release_memory(self, tags: tuple[str, ...] | list[str] = MEMORY_TAGS) -> None:
        """Free the KV pool ("kv_cache", drops the prefix cache) and/or move the weights to host memory
        ("weights"). Needs an idle engine; generating raises until resume_memory. Releasing a tag twice
        is a no-op."""
        tags = self._memory_tags(tags)
        if self.has_unfinished():
            raise RuntimeError("release_memory needs an idle engine: finish or abort running requests first")
        self._settle_in_flight()
        if not isinstance(self.runner, _Released):
            graphs = self.runner.graphs
            self.runner.graphs = None
            self.runner = _Released(self.runner, set(), graphs.max_bs if graphs is not None else None)
        state = self.runner
        if "kv_cache" in tags - state.tags:
            if not self.flush_cache():
                raise RuntimeError("the prefix cache is still in use; cannot release the KV cache")
            self.kv_pool.set_resident(False)
            state.tags.add("kv_cache")
        if "weights" in tags - state.tags:
            state.host_weights = [(p, self._to_host(p.data)) for p in self.model.parameters()]
            self.model.unstack_projections()    # the stacked q/k/v and gate/up tensors own their storage
            for p in self.model.parameters():   # tied weights are one parameter, listed once
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            state.tags.add("weights")
        if self.device.type == "cuda":
            # cuBLAS keeps a workspace per stream it ran on, and each capture runs on a new side stream:
            # without clearing, every release/resume cycle would strand one workspace (32 MiB on H100).
            torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.empty_cache()          # hand the freed blocks back for other processes as well

    def resume_memory(self, tags: tuple[str, ...] | list[str] = MEMORY_TAGS) -> None:
        """Bring released memory back: the KV pool reallocated (empty, same shapes) and/or the weights
        copied back into the same parameters. Once nothing is released, CUDA graphs are captured again
        and generation works as before. Resuming what isn't released is a no-op."""
        tags = self._memory_tags(tags)
        state = self.runner
        if not isinstance(state, _Released):
            return
        if "weights" in tags & state.tags:
            for p, host in state.host_weights:
                p.data = host.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)   # the pinned copies must land before they're freed
            self.model.stack_projections()            # the copies above gave each weight its own storage
            state.host_weights = []
            state.tags.discard("weights")
        if "kv_cache" in tags & state.tags:
            self.kv_pool.set_resident(True)
            state.tags.discard("kv_cache")
        if not state.tags:
            self.runner = state.runner
            if state.graph_max_bs is not None:
                self.runner.capture_cuda_graphs(self.pad_row, state.graph_max_bs)

    def _check_resident(self) -> None:
        if isinstance(self.runner, _Released):
            raise self.runner.error()

    def _memory_tags(self, tags: tuple[str, ...] | list[str]) -> set[str]:
        tags = {tags} if isinstance(tags, str) else set(tags)
        unknown = tags - set(self.MEMORY_TAGS)
        if unknown or not tags:
            raise ValueError(f"memory tags must be among {', '.join(self.MEMORY_TAGS)}; got {sorted(tags)}")
        return tags

    def _to_host(self, data: torch.Tensor) -> torch.Tensor:
        if data.device.type == "cpu":
            return data                       # a CPU engine's weights are host memory already
        host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
        host.copy_(data)
        return host


@dataclass
class _Released:
    """Stands in for the engine's runner while memory is released (no forward can reach freed buffers
    or stale CUDA graphs) and keeps what resume_memory needs."""
    runner: ModelRunner                     # the real runner, set aside
    tags: set[str]
    graph_max_bs: int | None                # CUDA graphs to capture again on resume (None: there were none)
    host_weights: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    graphs = None                           # reads like a runner without CUDA graphs

    def error(self) -> RuntimeError:
        return RuntimeError(f"the engine's memory is released ({', '.join(sorted(self.tags))}); "
                            f"call resume_memory() before generating")

    def forward(self, *args: object, **kwargs: object) -> None:
        raise self.error()
