"""POST /generate: SGLang-style token-in/token-out generation, single or batch, streaming or not."""
from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any, cast

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from rlserve.server.errors import APIError, error_body
from rlserve.server.frontend import EngineDeadError, RequestFailed, RequestResult, SeqState, Tagged
from rlserve.server.protocol import GenerateRequest, NativeSamplingParams
from rlserve.server.state import ServerState, finite, new_id, validated
from rlserve.server.streams import SSE_DONE, gather_or_cancel, merge, sse, until_disconnect


def native_params(sp: NativeSamplingParams, logprobs: int | None, logprobs_mode: str = "raw") -> dict[str, Any]:
    """`logprobs_mode`: the server's default (--logprobs-mode) for a request that does not say (a router
    drops the field)."""
    if "logprobs_mode" in sp.model_fields_set:
        logprobs_mode = sp.logprobs_mode
    seed = sp.seed if sp.seed is not None else sp.sampling_seed
    return validated({
        "n": sp.n, "max_tokens": sp.max_new_tokens, "min_tokens": sp.min_new_tokens,
        "temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k, "min_p": sp.min_p,
        "frequency_penalty": sp.frequency_penalty, "presence_penalty": sp.presence_penalty,
        "repetition_penalty": sp.repetition_penalty, "seed": seed, "stop": sp.stop,
        "stop_token_ids": sp.stop_token_ids, "ignore_eos": sp.ignore_eos,
        "skip_special_tokens": sp.skip_special_tokens, "include_stop_str_in_output": sp.include_stop_str_in_output,
        "logprobs": logprobs, "logprobs_mode": logprobs_mode, "json_schema": sp.json_schema, "regex": sp.regex, "ebnf": sp.ebnf,
    })


def version_spans(seq: SeqState, current: str) -> list[list[Any]]:
    """[[first output token index, weight version], ...]: each run of the sequence's tokens sampled under one
    weight version (a sequence with no word from the engine yet reports the version being served)."""
    return [[start, version] for start, version in seq.weight_version_spans] or [[0, current]]


class NativeServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.client = state.client

    def _prepare(self, req: GenerateRequest) -> tuple[bool, list[tuple[str, str | None, list[int], dict]]]:
        if (req.text is None) == (req.input_ids is None):
            raise APIError(400, "give exactly one of text or input_ids", param="text")
        prompts: list[tuple[str | None, list[int]]]
        if req.text is not None:
            batch = isinstance(req.text, list)
            texts = req.text if isinstance(req.text, list) else [req.text]
            prompts = [(t, self.client.encode(t)) for t in texts]
        else:
            ids = req.input_ids or []
            batch = bool(ids) and isinstance(ids[0], list)
            rows = cast(list[list[int]], ids) if batch else [cast(list[int], ids)]   # validated: one or the other
            prompts = [(None, list(p)) for p in rows]
        if not prompts:
            raise APIError(400, "the batch is empty", param="text")
        if len(prompts) > self.state.args.max_prompts_per_request:
            raise APIError(400, f"at most {self.state.args.max_prompts_per_request} prompts per request")
        for _, p in prompts:
            self.client.check_prompt(p)
        sps = req.sampling_params if req.sampling_params is not None else NativeSamplingParams()
        if isinstance(sps, list):
            if len(sps) != len(prompts):
                raise APIError(400, f"{len(sps)} sampling_params for {len(prompts)} prompts", param="sampling_params")
        else:
            sps = [sps] * len(prompts)
        k = req.top_logprobs_num if req.return_logprob else None
        if isinstance(req.rid, list):
            if not batch or len(req.rid) != len(prompts) or len(set(req.rid)) != len(req.rid):
                raise APIError(400, "rid must be a list of distinct ids, one per prompt", param="rid")
            rids = list(req.rid)
        elif req.rid is not None:
            rids = [req.rid] if not batch else [f"{req.rid}-{i}" for i in range(len(prompts))]
        else:
            base = new_id("gen")
            rids = [base] if not batch else [f"{base}-{i}" for i in range(len(prompts))]
        return batch, [(rid, text, ids, native_params(sp, k, self.state.args.logprobs_mode))
                       for rid, (text, ids), sp in zip(rids, prompts, sps)]

    def _item(self, res: RequestResult, j: int, seq: SeqState, return_logprob: bool, k: int) -> dict[str, Any]:
        fr = seq.finish_reason
        finish = None if fr is None else {"type": fr, "matched": seq.stop_reason}
        meta: dict[str, Any] = {
            "id": res.rid, "prompt_tokens": len(res.prompt_ids), "completion_tokens": len(seq.token_ids),
            "cached_tokens": res.cached_tokens, "finish_reason": finish,
            "e2e_latency": time.monotonic() - res.start_time,
            # The version being served when this item was written (a request spanning an update reports
            # the newer one); the spans say which version sampled which of its tokens.
            "weight_version": self.client.weight_version,
            "weight_version_spans": version_spans(seq, self.client.weight_version),
        }
        if return_logprob:
            lps = seq.logprobs or []
            meta["output_token_logprobs"] = [[finite(d.get(t, float("-inf"))), t, None]
                                             for t, d in zip(seq.token_ids, lps)]
            meta["output_top_logprobs"] = [[[finite(lp), a, None]
                                            for a, lp in sorted(d.items(), key=lambda kv: -kv[1])[:k]]
                                           for d in lps]
        return {"text": seq.text, "output_ids": list(seq.token_ids), "meta_info": meta}

    async def generate(self, request: Request, req: GenerateRequest) -> Any:
        batch, jobs = self._prepare(req)
        k = req.top_logprobs_num
        results = [RequestResult(rid, ids, [SeqState() for _ in range(params["n"])]) for rid, _, ids, params in jobs]
        n_total = sum(len(r.seqs) for r in results)
        if req.stream:
            for rid, *_ in jobs:
                self.state.metrics.start(rid)
            merged = merge([self.client.generate(rid, ids, params, text) for rid, text, ids, params in jobs])
            try:
                first = await until_disconnect(request, anext(merged))
            except BaseException:
                await merged.aclose()
                raise
            return StreamingResponse(self._stream(req, results, merged, first, n_total > 1),
                                     media_type="text/event-stream")

        async def one(res: RequestResult, text: str | None, params: dict) -> RequestResult:
            self.state.metrics.start(res.rid)
            try:
                async for u in self.client.generate(res.rid, res.prompt_ids, params, text):
                    res.apply(u)
            finally:
                self.state.metrics.forget(res.rid)
            return res
        await until_disconnect(request, gather_or_cancel(
            [one(res, text, params) for res, (_, text, _, params) in zip(results, jobs)]))
        items = [self._item(res, j, seq, req.return_logprob, k) for res in results for j, seq in enumerate(res.seqs)]
        return JSONResponse(items if batch or n_total > 1 else items[0])

    async def _stream(self, req: GenerateRequest, results: list[RequestResult],
                      merged: AsyncGenerator[Tagged, None], first: Tagged, indexed: bool
                      ) -> AsyncGenerator[bytes, None]:
        pending = [first]
        offsets = [0]
        for r in results:
            offsets.append(offsets[-1] + len(r.seqs))
        done = [False] * offsets[-1]
        try:
            while True:
                if pending:
                    i, u = pending.pop()
                else:
                    nxt = await anext(merged, None)
                    if nxt is None:
                        break
                    i, u = nxt
                res = results[i]
                res.apply(u)
                for d in u.seqs:
                    # One item a choice and update; a finished choice once (later updates still list it).
                    if done[offsets[i] + d.index]:
                        continue
                    done[offsets[i] + d.index] = d.finish_reason is not None
                    item = self._item(res, d.index, res.seqs[d.index], req.return_logprob, req.top_logprobs_num)
                    if indexed:
                        item["index"] = offsets[i] + d.index
                    yield sse(item)
            yield SSE_DONE
        except (RequestFailed, EngineDeadError) as e:
            yield sse(error_body(e.status if isinstance(e, RequestFailed) else 503, str(e)))
            yield SSE_DONE
        finally:
            await merged.aclose()
            for r in results:
                self.state.metrics.forget(r.rid)
