"""The load generator's client: one streamed completion timed chunk by chunk, and a run of many on a
schedule under a concurrency cap."""
from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from rlserve.bench.serving_workload import BenchRequest, arrival_times

if TYPE_CHECKING:
    import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"     # `rlserve serve`'s default --port


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0            # choice-carrying chunks


def completion_payload(req: BenchRequest, model: str | None, temperature: float) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "prompt": req.prompt, "max_tokens": req.output_len, "ignore_eos": True,
        "temperature": temperature, "stream": True,
        # continuous usage gives each chunk's token count on servers that report it; rlserve ignores it
        # and sends one token a chunk.
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if model:
        payload["model"] = model
    return payload


class StreamTimer:
    """Turns a completion stream's parsed chunks, with their arrival times, into a RequestResult."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.last_chunk: float | None = None
        self.tokens_seen = 0
        self.usage: dict[str, Any] | None = None
        self.res = RequestResult()

    def on_chunk(self, data: dict[str, Any], now: float) -> None:
        if "error" in data:
            err = data["error"]
            raise RuntimeError(f"error event: {err.get('message', err) if isinstance(err, dict) else err}")
        usage = data.get("usage")
        if usage:
            self.usage = usage
        if not data.get("choices"):
            return
        k = 1
        if usage and usage.get("completion_tokens") is not None:
            k = max(usage["completion_tokens"] - self.tokens_seen, 1)
        self.tokens_seen += k
        self.res.chunks += 1
        if self.last_chunk is None:
            self.res.ttft = now - self.start
            self.res.itl += [0.0] * (k - 1)      # tokens that came with the first one came without a gap
        else:
            self.res.itl += [(now - self.last_chunk) / k] * k
        self.last_chunk = now

    def finish(self, now: float, prompt_len: int) -> RequestResult:
        if self.last_chunk is None:
            raise RuntimeError("the stream ended without a token")
        res, usage = self.res, self.usage or {}
        res.e2e = now - self.start
        res.output_tokens = usage.get("completion_tokens", self.tokens_seen)
        res.prompt_tokens = usage.get("prompt_tokens", prompt_len)
        res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        res.ok = True
        return res


async def send_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> RequestResult:
    """One streamed completion; any failure comes back as a result with ok=False, never an exception."""
    timer = StreamTimer(time.perf_counter())
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")[:300]
                return RequestResult(error=f"HTTP {resp.status_code}: {body}")
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                timer.on_chunk(json.loads(data), time.perf_counter())
            if not done:
                raise RuntimeError("the stream ended without [DONE]")
        return timer.finish(time.perf_counter(), len(payload["prompt"]))
    except Exception as e:   # transport errors, error events, malformed chunks: one failed request, not a crash
        return RequestResult(error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


# ---- the run ----
@dataclass(frozen=True)
class RunConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    model: str | None = None
    request_rate: float = math.inf
    max_concurrency: int | None = None
    temperature: float = 0.0
    timeout_s: float = 3600.0
    seed: int = 0
    progress: bool = False


def make_client(cfg: RunConfig) -> httpx.AsyncClient:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    # No pool cap: with an infinite rate every request must be on the wire at once, and httpx's
    # default of 100 connections would queue the rest client-side (and time them out).
    return httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=httpx.Timeout(cfg.timeout_s, connect=30),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


class RunOutcome(NamedTuple):
    results: list[RequestResult]     # in request order
    duration_s: float                # first send to last finish
    client_cpu_s: float              # this process's CPU time meanwhile: a busy client delays timestamps


async def run_requests(client: httpx.AsyncClient, requests: list[BenchRequest], cfg: RunConfig,
                       offsets: list[float] | None = None) -> RunOutcome:
    """Send on the Poisson schedule (or at the given offsets from now, in seconds) under the concurrency cap."""
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    if offsets is None:
        offsets = arrival_times(len(requests), cfg.request_rate, cfg.seed)
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc="requests", file=sys.stderr)

    async def one(req: BenchRequest) -> RequestResult:
        payload = completion_payload(req, cfg.model, cfg.temperature)
        if sem is None:
            res = await send_request(client, "/v1/completions", payload)
        else:
            async with sem:
                res = await send_request(client, "/v1/completions", payload)
        if bar is not None:
            bar.update(1)
        return res

    start, cpu_start = time.perf_counter(), time.process_time()
    tasks = []
    for req, offset in zip(requests, offsets):
        # Sleep to an absolute offset so that scheduling delays don't accumulate into the rate.
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    duration, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if bar is not None:
        bar.close()
    return RunOutcome(list(results), duration, cpu)
