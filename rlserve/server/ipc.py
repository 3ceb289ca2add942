"""Messages between the front end and the engine process (msgspec msgpack over ZMQ PUSH/PULL)."""
from __future__ import annotations

from typing import Any

import msgspec


# ---- front end → engine ----
class AddRequest(msgspec.Struct, tag=True):
    rid: str
    prompt_ids: list[int]
    params: dict[str, Any]          # SamplingParams keyword arguments, already validated once
    prompt: str | None = None
    pooling: dict[str, Any] | None = None   # PoolingParams keyword arguments: an embedding/score request


class Abort(msgspec.Struct, tag=True):
    rid: str | None = None          # None aborts everything


class Query(msgspec.Struct, tag=True):
    qid: int
    what: str                       # "info" | "flush_cache"


class Admin(msgspec.Struct, tag=True):
    """An operation of the admin routes (weights, memory, pause, profiling); see server/admin_ops.py.
    Answered by a Reply with the same qid."""
    qid: int
    op: str
    args: dict[str, Any] = {}


class Shutdown(msgspec.Struct, tag=True):
    pass


Command = AddRequest | Abort | Query | Admin | Shutdown


# ---- engine → front end ----
# The per-request messages go out for every running request on every step: encoded as arrays (a
# quarter of the bytes) and untracked by the cyclic collector (they hold no cycles), which makes them
# ~30% cheaper to encode and decode.
class SeqDelta(msgspec.Struct, array_like=True, gc=False):
    """What one sequence (choice) of a request gained since the last update."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # The sequence's whole weight_version_spans (see CompletionOutput) when they changed since its last
    # delta (always in its first); None when unchanged.
    weight_version_spans: list[tuple[int, str]] | None = None


class Update(msgspec.Struct, array_like=True, gc=False):
    rid: str
    seqs: list[SeqDelta]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finished: bool = False
    error: str | None = None        # the request failed alone; `status` is the HTTP status to report
    status: int = 400
    prompt_logprobs: list[dict[int, float] | None] | None = None
    embedding: list[float] | None = None   # a finished pooling request's result


class Updates(msgspec.Struct, tag=True):
    items: list[Update]


class Reply(msgspec.Struct, tag=True):
    qid: int
    data: dict[str, Any]


class Ready(msgspec.Struct, tag=True):
    info: dict[str, Any]


class Failed(msgspec.Struct, tag=True):
    message: str


Event = Updates | Reply | Ready | Failed

encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(Command)
event_decoder = msgspec.msgpack.Decoder(Event)
