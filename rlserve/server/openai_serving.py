"""/v1/completions and /v1/chat/completions: OpenAI requests in, engine deltas out in OpenAI shapes."""
from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from rlserve.server import ipc, tools
from rlserve.server.errors import APIError, error_body
from rlserve.server.frontend import EngineDeadError, RequestFailed, RequestResult, SeqState, Tagged
from rlserve.server.native import version_spans
from rlserve.server.openai_checks import check_request, check_room, constraint_params, warn_unknown_fields
from rlserve.server.openai_logprobs import chat_logprobs, completion_logprobs, echo_logprobs, echo_text
from rlserve.server.protocol import ChatCompletionRequest, CompletionRequest, _Sampling
from rlserve.server.state import ServerState, new_id, validated
from rlserve.server.streams import SSE_DONE, gather_or_cancel, merge, sse, until_disconnect

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty")


def sampling_kwargs(req: _Sampling, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "n": req.n, "max_tokens": max_tokens, "min_tokens": req.min_tokens, "seed": req.seed,
        "stop": req.stop, "stop_token_ids": req.stop_token_ids, "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens, "logprobs": logprobs,
        "include_stop_str_in_output": req.include_stop_str_in_output,
    }
    if req.logit_bias:
        params["logit_bias"] = dict(req.logit_bias)
    for name in _OPTIONAL:
        if getattr(req, name) is not None:
            params[name] = getattr(req, name)
    return validated(params)


@dataclass
class Prepared:
    """A validated OpenAI request: one engine request per prompt, `n` choices each."""
    rid: str
    prompts: list[tuple[str | None, list[int]]]
    params: dict[str, Any]
    tools: list[tools.Tool] = field(default_factory=list)   # callable tools, when the reply may call them

    @property
    def n(self) -> int:
        return self.params["n"]


def with_response_format(params: dict[str, Any], rf: Any) -> dict[str, Any]:
    """Sampling params constrained by an OpenAI response_format (json_object or json_schema)."""
    if rf is not None and rf.type == "json_object":
        return validated({**params, "json_object": True})
    if rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise APIError(400, "response_format json_schema needs a json_schema.schema", param="response_format")
        return validated({**params, "json_schema": rf.json_schema.schema_})
    return params


def stream_chunk(rid: str, obj: str, created: int, model: str, choices: list[dict], include_usage: bool,
                 usage_now: dict[str, Any] | None = None) -> bytes:
    """One SSE chunk. With include_usage every chunk carries "usage": null until the final one, or, with
    continuous_usage_stats, the counts so far (`usage_now`), so a client can tell how many tokens a
    chunk holds when a stream that fell behind sends several in one."""
    body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        body["usage"] = usage_now
    return sse(body)


def continuous_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage and req.stream_options.continuous_usage_stats)


async def first_then(first: Tagged, rest: AsyncGenerator[Tagged, None]) -> AsyncGenerator[Tagged, None]:
    """The update that was awaited before the response started, then the rest of the stream."""
    yield first
    async for x in rest:
        yield x


def usage(results: list[RequestResult]) -> dict[str, int | dict[str, int]]:
    prompt = sum(r.prompt_tokens or len(r.prompt_ids) for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)}}


class OpenAIServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.client = state.client

    # ---- shared ----
    def _encode_prompts(self, prompt: Any) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and isinstance(prompt[0], int):      # validated: a list of ids throughout
            items = [list(prompt)]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(items) > self.state.args.max_prompts_per_request:
            raise APIError(400, f"at most {self.state.args.max_prompts_per_request} prompts per request",
                           param="prompt")
        out = []
        for p in items:
            text, ids = (p, self.client.encode(p)) if isinstance(p, str) else (None, list(p))
            self.client.check_prompt(ids)
            out.append((text, ids))
        return out

    def _streams(self, prep: Prepared) -> list[AsyncGenerator[ipc.Update, None]]:
        for i in range(len(prep.prompts)):
            self.state.metrics.start(f"{prep.rid}-{i}")
        return [self.client.generate(f"{prep.rid}-{i}", ids, prep.params, text)
                for i, (text, ids) in enumerate(prep.prompts)]

    async def _collect(self, request: Request, prep: Prepared) -> list[RequestResult]:
        async def one(i: int, text: str | None, ids: list[int]) -> RequestResult:
            res = RequestResult(f"{prep.rid}-{i}", ids, [SeqState() for _ in range(prep.n)])
            self.state.metrics.start(res.rid)
            try:
                async for u in self.client.generate(res.rid, ids, prep.params, text):
                    res.apply(u)
            finally:
                self.state.metrics.forget(res.rid)
            return res
        return await until_disconnect(
            request, gather_or_cancel([one(i, t, ids) for i, (t, ids) in enumerate(prep.prompts)]))

    async def _primed(self, request: Request, prep: Prepared) -> tuple[AsyncGenerator[Tagged, None], Tagged]:
        """Start the engine requests and wait for their first update, so that request errors
        (overload, a bad prompt) still become an HTTP error status instead of a broken stream."""
        merged = merge(self._streams(prep))
        try:
            first = await until_disconnect(request, anext(merged))
        except BaseException:
            await merged.aclose()
            raise
        return merged, first

    async def _guarded(self, prep: Prepared, stream: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """Once the stream has begun, a failure can only be reported in-band: an error event, then [DONE]."""
        try:
            async for s in stream:
                yield s
        except (RequestFailed, EngineDeadError) as e:
            status = e.status if isinstance(e, RequestFailed) else 503
            yield sse(error_body(status, str(e)))
            yield SSE_DONE
        finally:
            await stream.aclose()
            for i in range(len(prep.prompts)):
                self.state.metrics.forget(f"{prep.rid}-{i}")

    def _check(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        self.state.check_model(req.model)
        warn_unknown_fields(req)
        check_request(req, self.client.info["vocab_size"])

    # ---- /v1/completions ----
    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        self._check(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n (rlserve returns every sample)", param="best_of")
        params = sampling_kwargs(req, req.max_tokens, req.logprobs)
        if req.echo and req.logprobs is not None:
            params["prompt_logprobs"] = req.logprobs
        params = validated({**with_response_format(params, req.response_format), **constraint_params(req)})
        prompts = self._encode_prompts(req.prompt)
        if "max_tokens" in req.model_fields_set:
            for _, ids in prompts:
                check_room(len(ids), req.max_tokens, self.client.info["max_model_len"], "max_tokens")
        return Prepared(new_id("cmpl"), prompts, params)

    async def completion(self, request: Request, req: CompletionRequest) -> Any:
        prep = self.prepare_completion(req)
        if req.stream:
            merged, first = await self._primed(request, prep)
            return StreamingResponse(self._guarded(prep, self._completion_stream(req, prep, merged, first)),
                                     media_type="text/event-stream")
        results = await self._collect(request, prep)
        choices = []
        for i, res in enumerate(results):
            text_prefix = echo_text(self.client, prep.prompts[i][0], res.prompt_ids) if req.echo else ""
            for j, seq in enumerate(res.seqs):
                logprobs = None
                if req.logprobs is not None:
                    end = len(text_prefix) + len(seq.text)
                    logprobs, _ = completion_logprobs(self.client, seq.token_ids, seq.logprobs, req.logprobs,
                                                      len(text_prefix), end)
                    if req.echo:
                        echo, _ = echo_logprobs(self.client, res, req.logprobs, len(text_prefix))
                        logprobs = {key: echo[key] + logprobs[key] for key in logprobs}
                choices.append({"index": i * prep.n + j, "text": text_prefix + seq.text, "logprobs": logprobs,
                                "finish_reason": seq.finish_reason, "stop_reason": seq.stop_reason,
                                "weight_version_spans": version_spans(seq, self.client.weight_version)})
        return JSONResponse({"id": prep.rid, "object": "text_completion", "created": int(time.time()),
                             "model": self.state.model_name, "choices": choices, "usage": usage(results),
                             "weight_version": self.client.weight_version})

    async def _completion_stream(self, req: CompletionRequest, prep: Prepared,
                                 merged: AsyncGenerator[Tagged, None],
                                 first: Tagged) -> AsyncGenerator[bytes, None]:
        created, model = int(time.time()), self.state.model_name
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        results = [RequestResult(f"{prep.rid}-{i}", ids, [SeqState() for _ in range(prep.n)])
                   for i, (_, ids) in enumerate(prep.prompts)]
        offsets = [[0] * prep.n for _ in prep.prompts]
        ends = [[0] * prep.n for _ in prep.prompts]              # each choice's streamed text so far
        echoed = [[not req.echo] * prep.n for _ in prep.prompts]
        done = [[False] * prep.n for _ in prep.prompts]

        continuous = continuous_usage(req)

        def chunk(choices: list[dict]) -> bytes:
            return stream_chunk(prep.rid, "text_completion", created, model, choices, include_usage,
                                usage(results) if continuous else None)

        try:
            async for i, u in first_then(first, merged):
                results[i].apply(u)
                for d in u.seqs:
                    j = d.index
                    # A finished choice is sent once: later updates of its request still list it.
                    if done[i][j]:
                        continue
                    done[i][j] = d.finish_reason is not None
                    text = d.text
                    if not echoed[i][j]:
                        echoed[i][j] = True
                        prefix = echo_text(self.client, prep.prompts[i][0], prep.prompts[i][1])
                        text = prefix + text
                        offsets[i][j] = ends[i][j] = len(prefix)
                    if not (text or d.token_ids or d.finish_reason):
                        continue
                    ends[i][j] += len(d.text)
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs, offsets[i][j] = completion_logprobs(
                            self.client, d.token_ids, d.logprobs, req.logprobs, offsets[i][j], ends[i][j])
                    # One choice a chunk, as the peers send them.
                    yield chunk([{"index": i * prep.n + j, "text": text, "logprobs": logprobs,
                                  "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}])
            if include_usage:
                yield sse({"id": prep.rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage(results)})
            yield SSE_DONE
        finally:
            await merged.aclose()

    # ---- /v1/chat/completions ----
    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        self._check(req)
        if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
            raise APIError(400, "tool_choice needs tools: give the tools the model may call", param="tool_choice")
        messages = tools.messages_for_template(req.messages)
        offered = tools.parse_tools(req.tools or [])
        mode, callable_tools = tools.resolve_choice(offered, req.tool_choice)
        template_kwargs = dict(req.chat_template_kwargs or {})
        if mode != "none":
            if tools.template_supports_tools(getattr(self.client.tokenizer, 'chat_template', None)):
                template_kwargs["tools"] = req.tools
            else:
                messages = [{"role": "system", "content": tools.tools_system_prompt(callable_tools)}] + messages
        text = self.client.apply_chat_template(messages, req.add_generation_prompt, **template_kwargs)
        ids = self.client.encode(text)
        self.client.check_prompt(ids)
        k = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens
                             else (req.max_tokens, "max_tokens"))
        check_room(len(ids), max_tokens, self.client.info["max_model_len"], param)
        params = sampling_kwargs(req, max_tokens, k)
        rf = req.response_format
        params = validated({**with_response_format(params, rf), **constraint_params(req)})
        if mode == "forced":
            if rf is not None and rf.type != "text":
                raise APIError(400, "response_format can't be combined with a forced tool_choice",
                               param="tool_choice")
            params = validated({**params, "json_schema": tools.forced_call_schema(callable_tools)})
        return Prepared(new_id("chatcmpl"), [(text, ids)], params,
                        callable_tools if mode != "none" else [])

    def _tool_family(self) -> str:
        chosen = self.state.args.tool_call_parser
        return tools.family_for(self.client.info["architecture"]) if chosen == "auto" else chosen

    def _message(self, text: str, prep: Prepared) -> tuple[dict[str, Any], bool]:
        """The assistant message for a finished choice, and whether it called tools."""
        if prep.tools:
            content, calls = tools.parse_tool_calls(text, prep.tools, self._tool_family())
            if calls:
                return {"role": "assistant", "content": content,
                        "tool_calls": [c.to_openai() for c in calls]}, True
        return {"role": "assistant", "content": text}, False

    async def chat(self, request: Request, req: ChatCompletionRequest) -> Any:
        prep = self.prepare_chat(req)
        k = req.top_logprobs or 0
        if req.stream:
            merged, first = await self._primed(request, prep)
            return StreamingResponse(self._guarded(prep, self._chat_stream(req, prep, merged, first)),
                                     media_type="text/event-stream")
        (res,) = await self._collect(request, prep)
        choices = []
        for j, seq in enumerate(res.seqs):
            message, called = self._message(seq.text, prep)
            choices.append({"index": j, "message": message,
                            "logprobs": chat_logprobs(self.client, seq.token_ids, seq.logprobs, k)
                            if req.logprobs else None,
                            "finish_reason": "tool_calls" if called and seq.finish_reason == "stop"
                            else seq.finish_reason, "stop_reason": seq.stop_reason,
                            "weight_version_spans": version_spans(seq, self.client.weight_version)})
        return JSONResponse({"id": prep.rid, "object": "chat.completion", "created": int(time.time()),
                             "model": self.state.model_name, "choices": choices, "usage": usage([res]),
                             "weight_version": self.client.weight_version})

    async def _chat_stream(self, req: ChatCompletionRequest, prep: Prepared,
                           merged: AsyncGenerator[Tagged, None],
                           first: Tagged) -> AsyncGenerator[bytes, None]:
        created, model = int(time.time()), self.state.model_name
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        res = RequestResult(prep.rid, prep.prompts[0][1], [SeqState() for _ in range(prep.n)])
        k = req.top_logprobs or 0

        continuous = continuous_usage(req)

        def chunk(choices: list[dict]) -> bytes:
            return stream_chunk(prep.rid, "chat.completion.chunk", created, model, choices, include_usage,
                                usage([res]) if continuous else None)

        done = [False] * prep.n
        try:
            for j in range(prep.n):     # one choice a chunk, the role deltas too, as the peers send them
                yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for _, u in first_then(first, merged):
                res.apply(u)
                for d in u.seqs:
                    # A finished choice is sent once: later updates of the request still list it.
                    if done[d.index] or not (d.text or d.token_ids or d.finish_reason):
                        continue
                    done[d.index] = d.finish_reason is not None
                    choice: dict[str, Any]
                    if prep.tools:   # a call is only known once the choice is complete
                        if not d.finish_reason:
                            continue
                        message, called = self._message(res.seqs[d.index].text, prep)
                        delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                        if called:
                            delta["tool_calls"] = [{**c, "index": i} for i, c in enumerate(delta["tool_calls"])]
                        choice = {"index": d.index, "delta": delta, "logprobs": None,
                                  "finish_reason": "tool_calls" if called and d.finish_reason == "stop"
                                  else d.finish_reason, "stop_reason": d.stop_reason}
                    else:
                        choice = {"index": d.index, "delta": {"content": d.text} if d.text else {},
                                  "logprobs": chat_logprobs(self.client, d.token_ids, d.logprobs, k)
                                  if req.logprobs else None,
                                  "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}
                    yield chunk([choice])
            if include_usage:
                yield sse({"id": prep.rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage([res])})
            yield SSE_DONE
        finally:
            await merged.aclose()

