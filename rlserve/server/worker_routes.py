"""The routes a router (sglang-router) calls on a worker, beyond those every client uses.

sglang-router registers a worker by GET /health, then GET /server_info and /model_info (the newer
SGLang names of /get_server_info and /get_model_info; it falls back to the old ones on a 404). Its load
monitor (the power_of_two policy, and the router's own /get_loads) polls GET /get_load, which SGLang
answers with one entry per data-parallel rank; the router sums `num_tokens` over the entries. Health
checks poll GET /health; /flush_cache, /generate and the OpenAI routes are forwarded as they are.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI

from rlserve.server.state import ServerState

Handler = Callable[[], Awaitable[Any]]


def load_entry(engine: dict[str, Any]) -> dict[str, Any]:
    """SGLang's per-rank load record from the engine's info query. `num_tokens`: KV slots requests hold
    now (the prefix cache's reclaimable slots are not load)."""
    held = engine["kv_total"] - engine["kv_available"] - engine["tree_evictable_tokens"]
    return {"dp_rank": 0, "num_reqs": engine["num_running"] + engine["num_waiting"],
            "num_waiting_reqs": engine["num_waiting"], "num_tokens": max(held, 0)}


def add_worker_routes(app: FastAPI, st: Callable[[], ServerState], server_info: Handler,
                      model_info: Handler) -> None:
    """/get_load, and /server_info and /model_info answering as /get_server_info and /get_model_info."""
    app.add_api_route("/server_info", server_info, methods=["GET"])
    app.add_api_route("/model_info", model_info, methods=["GET"])

    @app.get("/get_load")
    async def get_load() -> Any:
        return [load_entry(await st().client.query("info"))]
