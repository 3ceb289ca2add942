"""Embedding and classification routes: OpenAI's `/v1/embeddings`, and SGLang's native `/encode`
(embeddings) and `/classify` (classification and reward models) with SGLang's request and response
shapes. Each prompt is one prefill-only request of the engine (engine/pooling.py), batched with the
others through the scheduler."""
from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from rlserve.server.errors import APIError
from rlserve.server.state import ServerState, new_id

TokenIds = list[StrictInt]
Input = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings body."""
    model_config = ConfigDict(extra="ignore")
    input: Input
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class EncodeRequest(BaseModel):
    """SGLang's EmbeddingReqInput (the body of /encode and /classify): text or input_ids, one or a list."""
    model_config = ConfigDict(extra="ignore")
    text: StrictStr | list[StrictStr] | None = None
    input_ids: TokenIds | list[TokenIds] | None = None
    rid: str | list[str] | None = None
    dimensions: StrictInt | None = None
    model: str | None = None


class PoolingServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _prompts(self, value: Any, param: str) -> list[list[int]]:
        """Token ids of each prompt: a string, a list of strings, token ids, or a list of token-id lists."""
        c = self.state.client
        items: list[Any]
        if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
            items = [value]
        else:
            items = list(value)
        if not items:
            raise APIError(400, f"{param} is empty: give at least one prompt", param=param)
        limit = self.state.args.max_prompts_per_request
        if len(items) > limit:
            raise APIError(400, f"at most {limit} prompts per request", param=param)
        prompts = [c.encode(x) if isinstance(x, str) else list(x) for x in items]
        for i, ids in enumerate(prompts):
            try:
                c.check_prompt(ids)
            except Exception as e:
                raise APIError(400, f"{param}[{i}]: {getattr(e, 'message', e)}", param=param) from e
        return prompts

    async def run(self, prompts: list[list[int]], pooling: dict[str, Any],
                  rids: list[str] | None = None) -> list[tuple[str, list[float], int]]:
        """(request id, result, cached tokens) per prompt, the prompts running side by side."""
        client = self.state.client
        rids = rids or [new_id("pool") for _ in prompts]

        async def one(rid: str, ids: list[int]) -> tuple[str, list[float], int]:
            last = None
            async for u in client.generate(rid, ids, {"n": 1}, None, pooling):
                last = u
            if last is None or last.embedding is None:
                raise APIError(503, "the request was aborted before it finished", code="aborted")
            return rid, last.embedding, last.cached_tokens
        tasks = [asyncio.ensure_future(one(r, p)) for r, p in zip(rids, prompts)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:         # one prompt failed: abort the others (closing their streams aborts them)
                t.cancel()
            raise

    async def embeddings(self, req: EmbeddingRequest) -> dict[str, Any]:
        self.state.check_model(req.model)
        prompts = self._prompts(req.input, "input")
        results = await self.run(prompts, {"task": "embed", "dimensions": req.dimensions})
        data = [{"object": "embedding", "index": i,
                 "embedding": _b64(vec) if req.encoding_format == "base64" else vec}
                for i, (_, vec, _) in enumerate(results)]
        n = sum(map(len, prompts))
        return {"object": "list", "data": data, "model": self.state.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    async def native(self, req: EncodeRequest, task: str) -> Any:
        """SGLang's answer: {"embedding", "meta_info"} for one prompt, a list of them for a list."""
        self.state.check_model(req.model)
        if (req.text is None) == (req.input_ids is None):
            raise APIError(400, "give exactly one of text or input_ids", param="text")
        value = req.text if req.text is not None else req.input_ids
        single = isinstance(value, str) or (isinstance(value, list) and bool(value) and isinstance(value[0], int))
        prompts = self._prompts(value, "text" if req.text is not None else "input_ids")
        rids = [req.rid] if isinstance(req.rid, str) else req.rid
        if rids is not None and len(rids) != len(prompts):
            raise APIError(400, f"{len(rids)} rids for {len(prompts)} prompts", param="rid")
        pooling: dict[str, Any] = {"task": task}
        if task == "embed":
            pooling["dimensions"] = req.dimensions
        start = time.monotonic()
        results = await self.run(prompts, pooling, rids)
        out = [{"embedding": vec,
                "meta_info": {"id": rid, "prompt_tokens": len(ids), "cached_tokens": cached,
                              "finish_reason": {"type": "length", "length": 0},
                              "e2e_latency": time.monotonic() - start,
                              "weight_version": self.state.client.weight_version}}
               for (rid, vec, cached), ids in zip(results, prompts)]
        return out[0] if single else out


def _b64(vec: list[float]) -> str:
    """OpenAI's base64 encoding: the float32 little-endian bytes."""
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def add_pooling_routes(app: FastAPI, st: Callable[[], ServerState], errors: dict[int | str, dict[str, Any]]) -> None:
    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors)
    async def embeddings(req: EmbeddingRequest) -> Any:
        return await PoolingServing(st()).embeddings(req)

    @app.post("/encode", responses=errors)
    async def encode(req: EncodeRequest) -> Any:
        return await PoolingServing(st()).native(req, "embed")

    @app.post("/classify", responses=errors)
    async def classify(req: EncodeRequest) -> Any:
        return await PoolingServing(st()).native(req, "classify")
