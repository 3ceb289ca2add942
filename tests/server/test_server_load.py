"""Concurrency, client disconnects, and the KV pool coming back to free afterwards."""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

N_REQUESTS, CONCURRENCY, N_DISCONNECT = 200, 32, 20


def wait_idle(server, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = server.info()
        if info["num_requests"] == 0 and info["frontend_in_flight"] == 0:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still in flight: {info}")
        time.sleep(0.1)


async def _one(client: httpx.AsyncClient, i: int, disconnect: bool) -> tuple[str, int | None]:
    stream = i % 2 == 0
    chat = i % 3 == 0
    max_tokens = 400 if disconnect else random.Random(i).randint(1, 4)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict = {"max_tokens": max_tokens, "temperature": 0.8, "seed": i, "ignore_eos": disconnect,
                  "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": f"request {i}: tell me something"}]
    else:
        body["prompt"] = f"request {i}: once upon a time"
    if stream:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return "status", r.status_code
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if disconnect and len(events) >= 2:
                        return "disconnected", None     # leaving the block closes the connection
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["id"] == chunks[0]["id"] for c in chunks)
        assert any(ch.get("finish_reason") for c in chunks for ch in c["choices"])
        return "ok", 200
    if disconnect:
        try:
            await client.post(path, json=body, timeout=0.3)
        except httpx.TimeoutException:
            return "disconnected", None
        return "finished-early", None
    r = await client.post(path, json=body)
    if r.status_code != 200:
        return "status", r.status_code
    data = r.json()
    assert data["choices"] and data["usage"]["completion_tokens"] >= 1
    key = "message" if chat else "text"
    assert key in data["choices"][0]
    return "ok", 200


async def _run(url: str) -> list[tuple[str, int | None]]:
    sem = asyncio.Semaphore(CONCURRENCY)
    disconnecters = set(random.Random(0).sample(range(N_REQUESTS), N_DISCONNECT))
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def guarded(i: int):
            async with sem:
                return await _one(client, i, i in disconnecters)
        return await asyncio.gather(*(guarded(i) for i in range(N_REQUESTS)))


def test_concurrent_mixed_load_with_disconnects(tiny_server):
    results = asyncio.run(_run(tiny_server.url))
    statuses = [s for kind, s in results if kind == "status"]
    assert not statuses, f"non-200 answers: {statuses}"
    assert sum(kind == "ok" for kind, _ in results) == N_REQUESTS - N_DISCONNECT
    assert sum(kind == "disconnected" for kind, _ in results) == N_DISCONNECT
    info = wait_idle(tiny_server)
    assert info["kv_leaked"] == 0
    # Everything not held by the prefix cache is free; flushing the cache frees the rest.
    assert info["kv_available"] + info["tree_tokens"] == info["kv_total"]
    assert httpx.post(tiny_server.url + "/flush_cache").status_code == 200
    info = tiny_server.info()
    assert info["kv_available"] == info["kv_total"]
    assert httpx.get(tiny_server.url + "/health").status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_the_request(default_server, stream):
    """A slow model: 1,000 tokens would take many seconds, so a prompt stop shows the abort."""
    url = default_server.url
    before = default_server.info()["stats"]["generation_tokens"]
    body = {"prompt": "Write a long story.", "max_tokens": 1000, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
    else:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json=body, timeout=1.0)
    # The abort shows in the count: well short of the 1,000 tokens the request asked for.
    info = wait_idle(default_server)
    assert info["stats"]["generation_tokens"] - before < 500
    assert info["kv_leaked"] == 0
    assert info["kv_available"] + info["tree_tokens"] == info["kv_total"]
