"""FastAPI routes, middleware and the server's entry point (`rlserve serve`)."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlserve.server import protocol as P
from rlserve.server.admin import ADMIN_PATHS, add_admin_routes, admin_denial, bearer_matches
from rlserve.server.errors import APIError, error_response
from rlserve.server.fast_json import FastJSONRoute
from rlserve.server.frontend import EngineClient, EngineDeadError, RequestFailed
from rlserve.server.metrics import Metrics, kv_split
from rlserve.server.native import NativeServing
from rlserve.server.openai_serving import OpenAIServing
from rlserve.server.pooling_routes import add_pooling_routes
from rlserve.server.state import ServerArgs, ServerState, model_name_for
from rlserve.server.streams import ClientDisconnected
from rlserve.server.worker_routes import add_worker_routes

log = logging.getLogger("rlserve.server")
OPEN_PATHS = {"/health"}
ERRORS: dict[int | str, dict[str, Any]] = {400: {"model": P.ErrorResponse}, 404: {"model": P.ErrorResponse}, 503: {"model": P.ErrorResponse}}


class Guard:
    """Pure ASGI (so client-disconnect detection keeps working): API key, body size, draining."""

    def __init__(self, app: ASGIApp, state_getter: Any) -> None:
        self.app = app
        self.get_state = state_getter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state: ServerState = self.get_state()
        path = scope["path"]
        headers = dict(scope["headers"])
        admin = path in ADMIN_PATHS
        if admin:
            denied = admin_denial(state.args, headers)
            if denied is not None:
                await _drain_body(receive)
                return await _send(send, denied)
        # On an admin route the admin key, when set, was checked above and stands in for the API key.
        if state.args.api_key and path not in OPEN_PATHS and not (admin and state.args.admin_api_key):
            if not bearer_matches(headers, state.args.api_key):
                await _drain_body(receive)
                return await _send(send, error_response(401, "invalid or missing API key: send "
                                                        "'Authorization: Bearer <key>'", code="invalid_api_key"))
        if state.draining and path not in OPEN_PATHS:
            await _drain_body(receive)
            return await _send(send, error_response(503, "the server is shutting down", code="shutting_down"))
        limit = state.args.max_body_bytes
        body, too_big = await _read_body(receive, limit)
        if too_big:
            return await _send(send, error_response(413, f"the request body exceeds {limit} bytes",
                                                    code="request_too_large"))
        if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b""):
            # `curl -d` sends a form content type; every POST body here is JSON.
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    chunks, size, too_big = [], 0, False
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        size += len(msg.get("body", b""))
        if size > limit:
            too_big = True       # keep reading so the client gets our answer, not a reset
        else:
            chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    return b"".join(chunks), too_big


async def _drain_body(receive: Receive) -> None:
    await _read_body(receive, 0)


async def _send(send: Send, response: Response) -> None:
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', msg)}", None
    return (f"{param}: {msg}" if param else msg) + (f" (and {len(errs) - 1} more errors)" if len(errs) > 1 else ""), param


def build_app(args: ServerArgs, client: EngineClient | None = None) -> FastAPI:
    holder: dict[str, ServerState] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        c = client or EngineClient(args.engine)
        await c.start()
        name = model_name_for(args)
        state = ServerState(args, c, Metrics(name), name)
        c.on_update = state.metrics.on_update
        holder["state"] = state
        app.state.rl = state
        log.info("serving %s on http://%s:%d", name, args.host, args.port)
        # What the front end holds for its lifetime (torch, transformers, the tokenizer: ~10^5 objects)
        # is kept out of the cyclic collector's view, as in the engine process. Streaming makes garbage
        # fast enough that full collections walking that heap cost more than decoding the engine's
        # messages. Unfrozen on the way out, for servers built inside tests.
        froze = gc.get_freeze_count() == 0
        if froze:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if froze:
                gc.unfreeze()
            await c.close()

    app = FastAPI(title="rlserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible and native APIs of rlserve.")
    app.router.route_class = FastJSONRoute       # before the routes below are declared
    app.add_middleware(Guard, state_getter=lambda: holder["state"])

    def st() -> ServerState:
        return holder["state"]

    # ---- errors ----
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        st().metrics.error(e.status)
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestFailed)
    async def _failed(_: Request, e: RequestFailed) -> JSONResponse:
        st().metrics.error(e.status)
        code = "overloaded" if e.status == 503 else None
        return error_response(e.status, e.message, code=code)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        st().metrics.error(503)
        return error_response(503, f"the engine is not available: {e}", code="engine_dead")

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        st().metrics.error(400)
        msg, param = _validation_message(e)
        return error_response(400, msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            msg = "no such route"
        return error_response(e.status_code, msg, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}")

    # ---- OpenAI ----
    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=ERRORS)
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        return await OpenAIServing(st()).completion(request, req)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Any:
        return await OpenAIServing(st()).chat(request, req)

    def model_card() -> dict[str, Any]:
        s = st()
        return {"id": s.model_name, "object": "model", "created": int(time.time()), "owned_by": "rlserve",
                "root": args.engine.model or s.model_name, "max_model_len": s.client.info["max_model_len"]}

    @app.get("/v1/models", response_model=P.ModelList)
    async def models() -> Any:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses=ERRORS)
    async def model(model_id: str) -> Any:
        st().check_model(model_id)       # 404 in OpenAI's shape (model_not_found) for another name
        return model_card()

    # ---- native ----
    @app.post("/generate", responses=ERRORS)
    async def generate(req: P.GenerateRequest, request: Request) -> Any:
        return await NativeServing(st()).generate(request, req)

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=ERRORS)
    async def tokenize(req: P.TokenizeRequest) -> Any:
        s = st()
        s.check_model(req.model)
        c = s.client
        text: str | None
        if req.messages is not None:
            text = c.apply_chat_template([m.model_dump(exclude_none=True) for m in req.messages],
                                         req.add_generation_prompt)
        elif (req.prompt is None) == (req.text is None):
            raise APIError(400, "give exactly one of prompt, text or messages", param="prompt")
        else:
            text = req.prompt if req.prompt is not None else req.text
        if c.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        try:
            ids = c.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        except Exception as e:
            raise APIError(400, f"cannot tokenize the text: {e}") from e
        return {"tokens": ids, "count": len(ids), "max_model_len": c.info["max_model_len"]}

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=ERRORS)
    async def detokenize(req: P.DetokenizeRequest) -> Any:
        s = st()
        s.check_model(req.model)
        c = s.client
        if c.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        size = len(c.tokenizer)
        bad = [t for t in req.tokens if t >= size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range for a vocabulary of {size}", param="tokens")
        return {"text": c.decode(req.tokens, skip_special_tokens=req.skip_special_tokens)}

    @app.get("/health")
    async def health() -> Response:
        s = st()
        if s.client.dead:
            return error_response(503, f"the engine is not available: {s.client.dead_reason}", code="engine_dead")
        if s.draining:
            return error_response(503, "the server is shutting down", code="shutting_down")
        return Response(status_code=200)

    @app.get("/health_generate", responses=ERRORS)
    async def health_generate(request: Request) -> Response:
        s = st()
        c = s.client
        ids = c.encode("Hi") if c.tokenizer is not None else [0]
        try:
            await asyncio.wait_for(c.collect(f"health-{time.monotonic_ns()}", ids,
                                             {"n": 1, "max_tokens": 1, "temperature": 0.0}), 60)
        except TimeoutError:
            return error_response(503, "the engine did not generate a token within 60 s", code="engine_stuck")
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info() -> Any:
        s = st()
        info = s.client.info
        return {"model_path": args.engine.model or s.model_name, "served_model_name": s.model_name,
                "tokenizer_path": args.engine.tokenizer, "is_generation": info.get("head") is None,
                "max_model_len": info["max_model_len"], "vocab_size": info["vocab_size"],
                "architecture": info["architecture"], "weight_version": s.client.weight_version}

    @app.get("/get_server_info")
    async def get_server_info() -> Any:
        s = st()
        engine = await s.client.query("info")
        # model_path and dp_size: what a router reads when it registers a worker (worker_routes.py)
        return {"version": "0.1.0", "model": s.model_name, "model_path": args.engine.model or s.model_name,
                "dp_size": 1, "max_total_tokens": s.client.info["kv_total"], "host": args.host, "port": args.port,
                "max_waiting_requests": args.engine.scheduler.max_waiting_requests,
                "drain_timeout": args.drain_timeout, "logprobs_mode": args.logprobs_mode,
                "max_model_len": s.client.info["max_model_len"], "device": s.client.info["device"],
                "dtype": s.client.info["dtype"], "frontend_in_flight": s.client.num_in_flight,
                "engine_pid": s.client.proc.pid if s.client.proc else None, "engine_alive": not s.client.dead,
                **engine, **kv_split(engine)}

    @app.post("/abort_request")
    async def abort_request(req: P.AbortRequest) -> Any:
        if not req.abort_all and req.rid is None:
            raise APIError(400, "give rid or abort_all", param="rid")
        await st().client.abort(None if req.abort_all else req.rid)
        return {"success": True}

    @app.post("/flush_cache", responses=ERRORS)
    async def flush_cache() -> Any:
        res = await st().client.query("flush_cache")
        if not res.get("success"):
            raise APIError(400, "the cache was not flushed: requests are using it; retry when idle")
        return {"success": True, "message": "Cache flushed."}

    add_admin_routes(app, st)
    add_worker_routes(app, st, get_server_info, get_model_info)
    add_pooling_routes(app, st, ERRORS)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        s = st()
        if not s.client.dead:
            try:
                s.metrics.set_engine(await s.client.query("info", timeout_s=5))
            except (TimeoutError, EngineDeadError):
                pass
        return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _abort_all(state: ServerState) -> None:
    if state.client.num_in_flight and not state.client.dead:
        log.warning("drain timeout: aborting %d request(s)", state.client.num_in_flight)
        await state.client.abort(None)


def run_server(args: ServerArgs) -> int:
    """Serve until SIGTERM/SIGINT, drain in-flight requests for args.drain_timeout seconds, exit 0."""
    import uvicorn

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = build_app(args)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state = app.state.rl if hasattr(app.state, "rl") else None
            if state is not None and not state.draining:
                state.draining = True
                loop = asyncio.get_event_loop()
                # At the deadline, abort what is left: those requests still answer, with finish_reason
                # "abort", before uvicorn's own (later) timeout would cut their connections.
                loop.call_soon_threadsafe(loop.call_later, args.drain_timeout,
                                          lambda: asyncio.ensure_future(_abort_all(state)))
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=math.ceil(args.drain_timeout) + 5, timeout_keep_alive=5,
                            access_log=False)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler lets us exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = Server(config)
    server.run()
    return 0 if server.started else 1


# ---- command line (`rlserve serve`) ----
def serve_from_args(args: argparse.Namespace) -> int:
    """Serve what the flags of rlserve.server.args.add_serve_args describe; a bad engine option raises a
    ValueError naming it. The waiting-queue limit is the engine's (max_waiting_requests). With --dp N > 1,
    N servers behind a router instead (rlserve.router)."""
    if getattr(args, "dp", 1) > 1:
        from rlserve.router.commands import serve_dp_from_args
        return serve_dp_from_args(args)
    from rlserve.config_args import engine_config_from_args

    return run_server(ServerArgs(engine=engine_config_from_args(args), host=args.host, port=args.port,
                                 api_key=args.api_key or None, served_model_name=args.served_model_name,
                                 drain_timeout=args.drain_timeout, log_level=args.log_level,
                                 tool_call_parser=args.tool_call_parser,
                                 admin_api_key=args.admin_api_key or None, profile_dir=args.profile_dir,
                                 logprobs_mode=getattr(args, "logprobs_mode", "raw")))
