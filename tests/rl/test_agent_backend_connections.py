"""The server backend keeps every live sample's turn in flight at once: 150 turns reach a /generate
stand-in together (httpx's default pool, 100 connections, held the rest back a whole turn)."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

from rlserve.rl.agent.backend import ServerBackend
from rlserve.sampling import SamplingParams

TURNS = 150


def gathering_app(state: dict[str, Any]) -> FastAPI:
    """/generate answers once TURNS requests are in at the same time (or after 10 s), recording the most
    it ever held at once."""
    app = FastAPI()

    @app.post("/generate")
    async def generate(body: dict[str, Any]) -> dict[str, Any]:
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        if state["now"] >= TURNS:
            state["all_in"].set()
        try:
            await asyncio.wait_for(state["all_in"].wait(), 10)
        except TimeoutError:
            pass
        state["now"] -= 1
        ids = [7, 8]
        return {"text": "ok", "output_ids": ids,
                "meta_info": {"output_token_logprobs": [[-0.5, t, None] for t in ids], "weight_version": "3",
                              "finish_reason": {"type": "stop"}}}
    return app


def test_every_live_turn_is_on_the_server_at_once():
    from benchmarks.router_standin import ServedApp

    state: dict[str, Any] = {"now": 0, "most": 0, "all_in": asyncio.Event()}   # bound to the server's loop on use
    with ServedApp(gathering_app(state), start_timeout_s=120) as server:        # generous: a busy machine
        async def turns() -> list:
            backend = ServerBackend([server.url])
            try:
                return await asyncio.gather(*(backend.generate([1, 2, 3], SamplingParams(max_tokens=2))
                                              for _ in range(TURNS)))
            finally:
                await backend.aclose()
        answers = asyncio.run(turns())
    assert state["most"] == TURNS and state["all_in"].is_set()
    assert all(t.token_ids == [7, 8] and t.logprobs == [-0.5, -0.5] and t.weight_versions == ["3", "3"]
               for t in answers)
