"""Where an assistant turn is generated: token ids in, token ids + logprobs out.

`EngineBackend` drives the in-process engine: every live sample's next turn is one engine request,
so all of them decode together in the engine's batch while finished turns wait on their tools. Only
its pump touches the engine (requests are added and aborted between steps; a step runs in a worker
thread so tools keep running meanwhile). `ServerBackend` sends each turn to an rlserve server's (or
sglang-router's) /generate with `input_ids`, which batches concurrent requests the same way.
"""
from __future__ import annotations

import asyncio
import itertools
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from rlserve.engine.engine import Engine
from rlserve.outputs import CompletionOutput
from rlserve.sampling import SamplingParams

if TYPE_CHECKING:
    from rlserve.client import AsyncClient


@dataclass
class Turn:
    token_ids: list[int]
    logprobs: list[float]                # the engine's logprob of each sampled token
    weight_versions: list[str]           # the weight version that sampled each token
    text: str
    finish_reason: str                   # stop | length | abort


class Backend(Protocol):
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Turn: ...


def versions_per_token(spans: tuple[tuple[int, str], ...], n: int, default: str) -> list[str]:
    """Expand (first token index, version) spans to one version per token."""
    out = [default] * n
    for k, (start, version) in enumerate(spans):
        end = spans[k + 1][0] if k + 1 < len(spans) else n
        out[start:end] = [version] * max(0, min(end, n) - start)
    return out


def turn_from_output(c: CompletionOutput, default_version: str) -> Turn:
    assert c.logprobs is not None        # agent turns always ask for logprobs
    ids = list(c.token_ids)
    return Turn(ids, [d[t] for d, t in zip(c.logprobs, ids)],
                versions_per_token(c.weight_version_spans, len(ids), default_version), c.text,
                c.finish_reason or "abort")


class EngineBackend:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._adds: list[tuple[list[int], SamplingParams, asyncio.Future[Turn]]] = []
        self._aborts: list[str] = []
        self._waiting: dict[str, asyncio.Future[Turn]] = {}
        self._pump: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="agent-engine")

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Turn:
        fut: asyncio.Future[Turn] = asyncio.get_running_loop().create_future()
        self._adds.append((prompt_ids, params, fut))
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run())
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:    # the sample was cancelled: free its request's KV at once
            self._aborts += [rid for rid, f in self._waiting.items() if f is fut]
            fut.cancel()
            raise

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._adds or self._waiting:
                for ids, params, fut in self._adds:
                    if not fut.done():
                        try:
                            self._waiting[self.engine.add_request(ids, params)] = fut
                        except Exception as e:       # a bad request fails its own sample only
                            fut.set_exception(e)
                self._adds.clear()
                for rid in self._aborts:
                    self.engine.abort(rid)
                    self._waiting.pop(rid, None)
                self._aborts.clear()
                if not self._waiting:
                    continue
                outs = await loop.run_in_executor(self._thread, self.engine.step, False)
                for out in outs:
                    if not out.finished:
                        continue
                    fut_or_none = self._waiting.pop(out.request_id, None)
                    if fut_or_none is not None and not fut_or_none.done():
                        fut_or_none.set_result(turn_from_output(out.outputs[0], self.engine.weight_version))
        except BaseException as e:
            for rid, fut in self._waiting.items():
                self.engine.abort(rid)
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else RuntimeError("engine pump stopped"))
            self._waiting.clear()
            raise

    def close(self) -> None:
        self._thread.shutdown(wait=True)


# SamplingParams fields the native /generate takes under the same name
NATIVE_KEYS = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
               "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
               "include_stop_str_in_output", "json_schema", "regex", "ebnf")
_DEFAULTS = SamplingParams()
# which sample a turn belongs to (set by AgentLoop.run_all): a sample's turns all go to one server
SAMPLE_INDEX: ContextVar[int] = ContextVar("agent_sample_index", default=0)
SAMPLES_PER_POOL = 16        # a ServerBackend's samples per HTTP connection pool (ServerBackend._client)
ABORT_RETRY_S = 1.0          # a cancelled turn's abort is sent again until its request answers


def native_sampling_params(params: SamplingParams, logprobs_mode: str | None, routed: bool = False
                           ) -> dict[str, Any]:
    """`params` as the native route's sampling_params. Through sglang-router the seed goes as
    `sampling_seed` and logprobs_mode is left to the workers' default (the router drops both)."""
    for key in ("min_tokens", "logit_bias", "json_object"):
        if getattr(params, key) != getattr(_DEFAULTS, key):
            raise ValueError(f"sampling parameter {key} has no /generate field")
    sp: dict[str, Any] = {k: getattr(params, k) for k in NATIVE_KEYS if getattr(params, k) != getattr(_DEFAULTS, k)}
    sp |= {"n": params.n, "temperature": params.temperature, "max_new_tokens": params.max_tokens}
    if routed and "seed" in sp:
        sp["sampling_seed"] = sp.pop("seed")
    elif logprobs_mode is not None:
        sp["logprobs_mode"] = logprobs_mode
    return sp


class ServerBackend:
    """Turns over HTTP: POST /generate with `input_ids` (rlserve.client.AsyncClient), one request per turn
    with its own rid, so a cancelled sample aborts its request on the server (POST /abort_request, its KV
    freed). Sample i's turns all go to server i mod k (its prefix stays cached there). Behind a router
    (`routed`: `urls` is the router's alone), the router picks the worker and forwards the rid, so a
    cancelled turn is aborted by rid on every worker in `worker_urls` (default: those the router lists).
    One instance per event loop: `aclose` when done."""

    def __init__(self, urls: list[str], admin_api_key: str | None = None, logprobs_mode: str | None = "tempered",
                 routed: bool = False, worker_urls: list[str] | None = None) -> None:
        from rlserve.client import AsyncClient

        if not urls:
            raise ValueError("ServerBackend needs at least one server URL")
        self.urls, self.admin_api_key = list(urls), admin_api_key
        # (server, pool) -> its client, made on first use; see _client
        self._pools: dict[tuple[int, int], AsyncClient] = {}
        self.workers: list[AsyncClient] = []      # where a cancelled turn is aborted behind a router
        if routed:       # the router does not route /abort_request; by default the workers it lists now
            if worker_urls is None:
                from rlserve.router.registry import WorkerRegistry
                worker_urls = WorkerRegistry(urls[0]).urls()
            self.workers = [AsyncClient(u, admin_api_key=admin_api_key) for u in worker_urls]
        self.logprobs_mode, self.routed = logprobs_mode, routed
        self.prefix = f"agent-{uuid.uuid4().hex[:12]}-"
        self._rids = itertools.count()

    def _client(self, sample: int) -> AsyncClient:
        """Sample i's client: server i mod k, and one connection pool per SAMPLES_PER_POOL of its samples.
        No timeout (a turn may wait behind a weight push or a long batch) and no connection bound (httpx's
        default, 100, held every live sample past the 100th back a whole turn). Several small pools, not one:
        httpcore scans every connection of a pool for every request it places, which at 128 live samples
        in one pool cost ~2.4 s of this process's CPU (and GIL) a rollout of 256 turns."""
        from rlserve.client import AsyncClient

        key = (sample % len(self.urls), sample // len(self.urls) // SAMPLES_PER_POOL)
        client = self._pools.get(key)
        if client is None:
            client = self._pools[key] = AsyncClient(self.urls[key[0]], admin_api_key=self.admin_api_key,
                                                    timeout=None, max_connections=None)
        return client

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Turn:
        client = self._client(SAMPLE_INDEX.get())
        rid = f"{self.prefix}{next(self._rids)}"
        sp = native_sampling_params(params, self.logprobs_mode, self.routed)
        request = asyncio.ensure_future(client.generate(input_ids=prompt_ids, sampling_params=sp, rid=rid,
                                                        return_logprob=True))
        try:
            item = await asyncio.shield(request)
        except asyncio.CancelledError:    # the sample was cancelled: its request stops on the server too
            targets = self.workers if self.routed else [client]
            # a worker that does not hold the rid answers success and does nothing; an abort that reached
            # the worker before the request (still in the router) is sent again
            while not request.done():
                await asyncio.gather(*(c.abort_request(rid) for c in targets), return_exceptions=True)
                await asyncio.wait([request], timeout=ABORT_RETRY_S)
            with suppress(Exception):
                request.result()           # answered at once once aborted: nothing left running
            raise
        item = item[0] if isinstance(item, list) else item
        meta = item["meta_info"]
        ids = list(item["output_ids"])
        version = str(meta.get("weight_version"))
        spans = tuple((int(s), str(v)) for s, v in meta.get("weight_version_spans") or [(0, version)])
        finish = (meta.get("finish_reason") or {}).get("type", "abort")
        return Turn(ids, [lp for lp, _, _ in meta["output_token_logprobs"]],
                    versions_per_token(spans, len(ids), version), item["text"], finish)

    async def aclose(self) -> None:
        for c in [*self._pools.values(), *self.workers]:
            await c.aclose()
        self._pools.clear()
