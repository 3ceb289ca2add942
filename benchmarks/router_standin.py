"""The router's own added latency: one stand-in worker with a fixed step time, timed directly and through
sglang-router (`python benchmarks/router.py overhead`).

The stand-in is a FastAPI app served by uvicorn in a thread of this process. It answers what the router
calls on a worker (/health, /server_info, /model_info, /get_server_info, /get_model_info, /get_load; the
shapes of rlserve/server/worker_routes.py) and /generate and /v1/completions after --step-ms: one JSON
answer, or a stream of --chunks chunks --step-ms apart. Requests go one at a time (no queueing
anywhere), alternating direct and through the router, over one keep-alive connection each. Reported per
route and mode: p50 and p99 of the latency (non-streaming: the whole answer; streaming: the first chunk
and the end of the stream) directly and through the router, and their difference: the router's cost.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from rlserve.bench.serving_stats import percentile
from rlserve.net import free_port
from rlserve.router.config import POLICIES, RouterConfig
from rlserve.router.launch import RouterProcess

MODEL = "stand-in"


def standin_app(step_s: float, chunks: int) -> Any:
    app = FastAPI()
    server_info = {"version": "0.1.0", "model": MODEL, "model_path": MODEL, "dp_size": 1,
                   "max_total_tokens": 1 << 20, "max_model_len": 4096}
    model_info = {"model_path": MODEL, "served_model_name": MODEL, "is_generation": True,
                  "max_model_len": 4096, "vocab_size": 1000}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {}

    for path in ("/server_info", "/get_server_info"):
        app.add_api_route(path, lambda: server_info, methods=["GET"])
    for path in ("/model_info", "/get_model_info"):
        app.add_api_route(path, lambda: model_info, methods=["GET"])

    @app.get("/get_load")
    async def get_load() -> list[dict[str, int]]:
        return [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]

    def sse(chunk: Any) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(chunks):
                await asyncio.sleep(step_s)
                yield b"data: " + json.dumps(chunk(i)).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        return gen()

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        body = await request.json()
        meta = {"id": "0", "prompt_tokens": 4, "completion_tokens": 1, "finish_reason": None}
        if body.get("stream"):
            return StreamingResponse(sse(lambda i: {"text": " x" * (i + 1), "meta_info": {
                **meta, "completion_tokens": i + 1}}), media_type="text/event-stream")
        await asyncio.sleep(step_s)
        return {"text": " x", "meta_info": {**meta, "finish_reason": {"type": "length", "length": 1}}}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        base = {"id": "cmpl-0", "object": "text_completion", "created": int(time.time()), "model": MODEL}
        if body.get("stream"):
            return StreamingResponse(sse(lambda i: {**base, "choices": [
                {"index": 0, "text": " x", "logprobs": None, "finish_reason": None}]}),
                media_type="text/event-stream")
        await asyncio.sleep(step_s)
        return {**base, "choices": [{"index": 0, "text": " x", "logprobs": None, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}

    return app


class ServedApp:
    """An ASGI app on a free loopback port, served by uvicorn in a daemon thread of this process."""

    def __init__(self, app: Any, start_timeout_s: float = 30.0) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="stand-in")

    def __enter__(self) -> ServedApp:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the stand-in server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class StandIn(ServedApp):
    """The stand-in worker (standin_app) served in this process."""

    def __init__(self, step_s: float, chunks: int) -> None:
        super().__init__(standin_app(step_s, chunks))


def payload(route: str, stream: bool) -> dict[str, Any]:
    if route == "/generate":
        return {"text": "Hello there", "sampling_params": {"max_new_tokens": 1}, "stream": stream}
    return {"model": MODEL, "prompt": "Hello there", "max_tokens": 1, "stream": stream}


def timed(client: httpx.Client, route: str, stream: bool) -> tuple[float, float]:
    """(first byte of the answer's body, end) in seconds from the send."""
    start = time.perf_counter()
    first = None
    with client.stream("POST", route, json=payload(route, stream)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{client.base_url}{route}: HTTP {r.status_code} {r.read()[:200]!r}")
        for _ in r.iter_bytes():
            if first is None:
                first = time.perf_counter() - start
    end = time.perf_counter() - start
    return (first if first is not None else end), end


def measure(direct: str, router: str, route: str, stream: bool, n: int, warmup: int) -> list[dict[str, Any]]:
    """n requests each way, alternating; p50/p99 of the whole answer, or of a stream's first chunk and end."""
    times: dict[str, list[tuple[float, float]]] = {"direct": [], "router": []}
    with httpx.Client(base_url=direct, timeout=60) as d, httpx.Client(base_url=router, timeout=60) as rt:
        for i in range(warmup + n):
            for name, client in (("direct", d), ("router", rt)):
                t = timed(client, route, stream)
                if i >= warmup:
                    times[name].append(t)
    rows = []
    for what, k in ((("first chunk", 0), ("end", 1)) if stream else (("answer", 1),)):
        out: dict[str, Any] = {"route": route, "stream": stream, "what": what, "n": n}
        for q in (50, 99):
            dq = percentile([t[k] for t in times["direct"]], q) * 1e3
            rq = percentile([t[k] for t in times["router"]], q) * 1e3
            out[f"direct_p{q}_ms"], out[f"router_p{q}_ms"], out[f"added_p{q}_ms"] = dq, rq, rq - dq
        rows.append(out)
    return rows


def main(args: argparse.Namespace) -> int:
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="router-overhead-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with StandIn(args.step_ms / 1e3, args.chunks) as worker:
        cfg = RouterConfig(policy=args.policy)
        router = RouterProcess(cfg, [worker.url], "127.0.0.1", free_port(), log_dir / "router.log").start()
        try:
            router.wait_workers([worker.url])
            for route in args.routes:
                for stream in (False, True):
                    rows.extend(measure(worker.url, router.url, route, stream, args.requests, args.warmup))
        finally:
            router.stop()
    print(f"router ({args.policy}) in front of one stand-in worker of {args.step_ms:g} ms a step "
          f"({args.chunks} steps a stream); {args.requests} requests each way, one at a time")
    head = f"{'route':<17}{'mode':<22}{'direct p50':>11}{'p99':>8}{'router p50':>12}{'p99':>8}{'added p50':>11}{'p99':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        mode = f"stream, {r['what']}" if r["stream"] else "non-streaming"
        print(f"{r['route']:<17}{mode:<22}{r['direct_p50_ms']:>11.2f}{r['direct_p99_ms']:>8.2f}"
              f"{r['router_p50_ms']:>12.2f}{r['router_p99_ms']:>8.2f}{r['added_p50_ms']:>11.2f}"
              f"{r['added_p99_ms']:>8.2f}")
    print("(ms; added = through the router − direct, percentile by percentile)")
    if args.json_out:
        line = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bench": "router overhead",
                "config": {k: v for k, v in vars(args).items() if k not in ("func", "json_out")}, "runs": rows}
        with open(args.json_out, "a") as f:
            f.write(json.dumps(line) + "\n")
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-ms", type=float, default=20.0, help="the stand-in's time before each answer or chunk")
    p.add_argument("--chunks", type=int, default=4, help="chunks of a streamed answer (default 4)")
    p.add_argument("--requests", type=int, default=200, help="timed requests each way, per route and mode")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--routes", nargs="+", default=["/v1/completions", "/generate"],
                   choices=["/v1/completions", "/generate"])
    p.add_argument("--policy", default="cache_aware", choices=POLICIES)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json-out", default=None)
