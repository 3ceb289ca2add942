"""Decode slots reserved in runs per request (RequestMemory.alloc_decode): runs while the free list has
room, single slots when it hasn't, and every reserved slot accounted for and given back."""
from __future__ import annotations

from rlserve.engine.cache import ReqToTokenPool, TokenAllocator
from rlserve.engine.memory import DECODE_RESERVE, RequestMemory
from rlserve.engine.request import Request
from rlserve.sampling import SamplingParams


def _request(memory: RequestMemory, i: int) -> Request:
    req = Request(rid=str(i), group=str(i), index=0, prompt_ids=[1], params=SamplingParams(), max_new_tokens=8,
                  arrival=i)
    req.row = memory.table.alloc()
    return req


def _decode(memory: RequestMemory, reqs: list[Request]) -> list[int]:
    """One decode step's slots, written into the requests' rows as the engine does."""
    slots = memory.alloc_decode(reqs)
    assert slots is not None
    for r, s in zip(reqs, slots.tolist()):
        memory.table.table[r.row, r.kv_len] = s
        r.kv_len += 1
    return slots.tolist()


def test_runs_while_the_pool_has_room_then_single_slots():
    memory = RequestMemory(TokenAllocator(3 * DECODE_RESERVE + 2), ReqToTokenPool(8, 64, "cpu"), tree=None)
    a, b = _request(memory, 0), _request(memory, 1)
    steps = [_decode(memory, [a, b]) for _ in range(DECODE_RESERVE)]
    for col in range(2):     # each request's slots over the steps are one run
        run = [s[col] for s in steps]
        assert run == list(range(run[0], run[0] + DECODE_RESERVE))
    assert memory.leaked([a, b]) == 0
    # 18 slots left: not enough for two more runs and the step, so each request now takes one slot
    assert memory.allocator.available() == DECODE_RESERVE + 2
    assert memory.decode_need([a, b]) == 2
    _decode(memory, [a, b])
    assert memory.reserve_left[a.row] == memory.reserve_left[b.row] == 0
    assert memory.allocator.available() == DECODE_RESERVE
    assert memory.leaked([a, b]) == 0


def test_reserved_slots_are_counted_and_given_back():
    memory = RequestMemory(TokenAllocator(100), ReqToTokenPool(8, 64, "cpu"), tree=None)
    reqs = [_request(memory, i) for i in range(3)]
    _decode(memory, reqs)
    assert memory.allocator.available() == 100 - 3 * DECODE_RESERVE
    assert memory.decode_need(reqs) == 0               # the next steps come from the reservations
    assert memory.leaked(reqs) == 0                    # unused reserved slots belong to their requests
    assert memory.leaked(reqs[1:]) == DECODE_RESERVE   # ...and a forgotten request's show as a leak
    for r in reqs:
        memory.release(r, cache=False)
    assert memory.allocator.available() == 100
    assert memory.leaked([]) == 0
