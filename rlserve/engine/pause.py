"""Pausing generation between steps (SGLang's pause_generation / continue_generation).

An RL trainer pauses its rollout engine to push new weights. Pausing first reads any overlapped step
still on the device (its tokens go to their requests as usual), so that nothing runs while paused; from
then on step() launches nothing until continue_generation, and add_request still queues (new requests
wait). The modes differ in what happens to the requests already there:

- "abort": every unfinished request (running or waiting) ends with finish_reason "abort"; their KV goes
  back to the pool (its written part to the prefix cache, which the next weight update flushes).
- "retract": running requests (a prompt being chunked too) go back to the waiting queue with their KV
  given back, as the scheduler retracts under memory pressure; on continue they are computed again from
  their prompt and the tokens they already have, so greedy and seeded sampling give the same tokens as an
  uninterrupted run (with the same weights).
- "in_place": nothing changes but stepping stops; requests keep their KV. After a weight update they go on
  with KV computed by the old weights (as in SGLang).

Outputs the pause produces (the tokens of the step read while pausing, the aborted requests' final
outputs) come out of the next step() call, paused or not, so a loop that emits what step() returns
delivers them; has_unfinished() stays true until they have.
"""
from __future__ import annotations

from typing import Protocol

from rlserve.engine.scheduler import Scheduler
from rlserve.engine.stops import Group
from rlserve.outputs import RequestOutput

PAUSE_MODES = ("abort", "retract", "in_place")


class Stepping(Protocol):
    """What reading an in-flight step uses of Engine."""
    pending_outputs: dict[str, RequestOutput]

    @property
    def in_flight(self) -> bool: ...
    def step(self) -> list[RequestOutput]: ...


class PauseHost(Stepping, Protocol):
    """The part of Engine pausing uses."""
    groups: dict[str, Group]
    scheduler: Scheduler
    pause_mode: str | None

    def abort(self, rid: str) -> RequestOutput | None: ...


def stash(engine: Stepping, outs: list[RequestOutput]) -> None:
    """Keep outputs for the next step() to return; a later output of a request replaces an earlier one
    (outputs are cumulative)."""
    for out in outs:
        engine.pending_outputs.pop(out.request_id, None)     # keep arrival order: the latest goes last
        engine.pending_outputs[out.request_id] = out


def take(engine: Stepping, outs: list[RequestOutput]) -> list[RequestOutput]:
    """The outputs kept for this step followed by (and merged with) the step's own."""
    if not engine.pending_outputs:
        return outs
    stash(engine, outs)
    merged = list(engine.pending_outputs.values())
    engine.pending_outputs.clear()
    return merged


def settle(engine: Stepping) -> None:
    """Read an overlapped step left on the device; what it outputs waits for the next step()."""
    while engine.in_flight:
        stash(engine, engine.step())


def pause(engine: PauseHost, mode: str) -> int:
    """Stop stepping (see the module docstring). Pausing a paused engine applies the new mode to the
    requests there now. Returns how many requests (samples) the mode affected: aborted, retracted, or
    (in_place) held with their KV."""
    if mode not in PAUSE_MODES:
        raise ValueError(f"pause mode must be one of {', '.join(PAUSE_MODES)}; got {mode!r}")
    engine.pause_mode = mode
    settle(engine)          # with pause_mode set, step() only reads what is in flight
    sched = engine.scheduler
    if mode == "abort":
        n = 0
        for rid in list(engine.groups):
            n += sum(not r.finished for r in engine.groups[rid].reqs)
            out = engine.abort(rid)
            if out is not None:
                stash(engine, [out])
        return n
    if mode == "retract":
        return sched.retract_all()
    return len(sched.running) + (sched.chunked is not None)


def resume(engine: PauseHost) -> None:
    """Let step() schedule again; a no-op when not paused."""
    engine.pause_mode = None
