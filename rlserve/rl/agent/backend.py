"""Where an assistant turn is generated: token ids in, token ids + logprobs out.

`EngineBackend` drives the in-process engine: every live sample's next turn is one engine request,
so all of them decode together in the engine's batch while finished turns wait on their tools. Only
its pump touches the engine (requests are added and aborted between steps; a step runs in a worker
thread so tools keep running meanwhile). `ServerBackend` sends each turn to an rlserve/SGLang server's
/generate with `input_ids`, which batches concurrent requests the same way.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from rlserve.engine.engine import Engine
from rlserve.outputs import CompletionOutput
from rlserve.sampling import SamplingParams


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


class ServerBackend:
    """Turns over HTTP: POST /generate with input_ids (one request per turn, in a thread each)."""

    def __init__(self, client: Any, logprobs_mode: str | None = "tempered") -> None:
        self.client = client             # rlserve.client.Client (or a router's)
        self.logprobs_mode = logprobs_mode

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Turn:
        sp: dict[str, Any] = {"temperature": params.temperature, "max_new_tokens": params.max_tokens,
                              "seed": params.seed, "stop_token_ids": params.stop_token_ids}
        if self.logprobs_mode is not None:
            sp["logprobs_mode"] = self.logprobs_mode
        for key in ("regex", "json_schema", "ebnf"):
            if getattr(params, key) is not None:
                sp[key] = getattr(params, key)
        item = await asyncio.to_thread(self.client.generate, input_ids=prompt_ids,
                                       sampling_params={k: v for k, v in sp.items() if v is not None},
                                       return_logprob=True)
        item = item[0] if isinstance(item, list) else item
        meta = item["meta_info"]
        ids = list(item["output_ids"])
        version = str(meta.get("weight_version"))
        spans = tuple((int(s), str(v)) for s, v in meta.get("weight_version_spans") or [(0, version)])
        finish = (meta.get("finish_reason") or {}).get("type", "abort")
        return Turn(ids, [lp for lp, _, _ in meta["output_token_logprobs"]],
                    versions_per_token(spans, len(ids), version), item["text"], finish)
