"""A stream that falls behind merges the engine's queued updates; errors are never merged away."""
from __future__ import annotations

import asyncio

from rlserve.server import ipc
from rlserve.server.frontend import RequestResult, SeqState, coalesce, merge_updates


def upd(tokens: list[int], text: str, index: int = 0, finished: bool = False, reason: str | None = None,
        lps: bool = False, error: str | None = None) -> ipc.Update:
    logprobs = [{t: -0.5} for t in tokens] if lps else None
    return ipc.Update("r", [ipc.SeqDelta(index, text, tokens, logprobs, reason)], 3, 1, finished, error)


def replay(updates: list[ipc.Update], n: int = 1) -> RequestResult:
    res = RequestResult("r", [1, 2, 3], [SeqState() for _ in range(n)])
    for u in updates:
        res.apply(u)
    return res


def test_merge_is_the_same_as_applying_one_after_the_other():
    parts = [upd([5], "a", lps=True), upd([6, 7], "bc", lps=True), upd([8], "d", index=1, lps=True),
             upd([9], "e", finished=True, reason="length", lps=True)]
    merged = merge_updates(parts)
    want, got = replay(parts, 2), replay([merged], 2)
    assert got.seqs == want.seqs and merged.finished
    assert got.seqs[0].token_ids == [5, 6, 7, 9] and got.seqs[0].finish_reason == "length"
    assert [d.index for d in merged.seqs] == [0, 1]


def test_coalesce_takes_what_is_queued_and_keeps_errors_apart():
    async def run():
        q: asyncio.Queue = asyncio.Queue()
        for u in (upd([2], "b"), upd([3], "c"), upd([], "", error="boom"), upd([4], "d")):
            q.put_nowait(u)
        first, held = coalesce(upd([1], "a"), q)
        assert first.seqs[0].token_ids == [1, 2, 3] and first.seqs[0].text == "abc"
        assert held.error == "boom"            # returned, not merged or dropped
        assert q.qsize() == 1                  # the update after the error waits its turn
        alone, held = coalesce(upd([7], "x"), asyncio.Queue())
        assert alone.seqs[0].token_ids == [7] and held is None
        done, held = coalesce(upd([9], "z", finished=True), q)
        assert done.seqs[0].token_ids == [9] and held is None and q.qsize() == 1   # nothing after the end
    asyncio.run(run())
