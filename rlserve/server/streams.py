"""Async plumbing shared by the routes: merge request streams, stop on client disconnect, SSE."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

T = TypeVar("T")
_END = object()


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, cancelling it (which aborts its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected()


async def gather_or_cancel(aws: list[Awaitable[T]]) -> list[T]:
    """Like gather, but the first failure cancels the rest (so their engine requests are aborted)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        if any(not t.done() for t in tasks):
            await asyncio.wait(tasks)


async def merge(streams: list[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several async iterators as items arrive, tagging each with its stream's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    q: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(i: int, it: AsyncGenerator[T, None]) -> None:
        try:
            async for item in it:
                q.put_nowait((i, item))
        except Exception as e:
            q.put_nowait(e)
        finally:
            q.put_nowait(_END)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            item = await q.get()
            if item is _END:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# msgspec writes a chunk ~5x faster than json.dumps; at tens of thousands of streamed tokens a second
# the front end's per-chunk cost decides how many tokens it can stream. Non-finite floats become null
# (logprobs are clamped before they get here).
_encode = msgspec.json.Encoder().encode


def sse(data: Any) -> bytes:
    return b"data: " + _encode(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
