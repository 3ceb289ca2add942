"""The front end's side of the engine: spawn the engine process, talk to it over ZMQ, tokenize.

`EngineClient.generate` yields one `ipc.Update` (deltas) per engine step that touched the request;
leaving the iteration early (a client disconnect cancels it) aborts the request in the engine.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from rlserve.config import EngineConfig
from rlserve.server import ipc
from rlserve.server.core import run_engine

log = logging.getLogger("rlserve.server")
WATCH_INTERVAL_S = 0.25
# A weight load or a broadcast from a trainer may take minutes; the engine answers when it is done.
ADMIN_TIMEOUT_S = 3600.0


# An update of one of a request's prompts, tagged with the prompt's index (streams.merge yields these).
Tagged = tuple[int, ipc.Update]


class EngineDeadError(RuntimeError):
    pass


class RequestFailed(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass
class SeqState:
    """The cumulative state of one choice, rebuilt from deltas."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    weight_version_spans: list[tuple[int, str]] = field(default_factory=list)

    def apply(self, d: ipc.SeqDelta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
        self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason
        if d.weight_version_spans is not None:
            self.weight_version_spans = d.weight_version_spans


@dataclass
class RequestResult:
    """A finished (or aborted) request, cumulative."""
    rid: str
    prompt_ids: list[int]
    seqs: list[SeqState]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    first_token_time: float | None = None
    start_time: float = field(default_factory=time.monotonic)

    def apply(self, u: ipc.Update) -> None:
        for d in u.seqs:
            self.seqs[d.index].apply(d)
        self.prompt_tokens = u.prompt_tokens or self.prompt_tokens
        self.cached_tokens = u.cached_tokens or self.cached_tokens
        if u.prompt_logprobs is not None:
            self.prompt_logprobs = u.prompt_logprobs

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


def merge_updates(updates: list[ipc.Update]) -> ipc.Update:
    """One update with the deltas of `updates`, oldest first."""
    texts: dict[int, list[str]] = {}
    ids: dict[int, list[int]] = {}
    lps: dict[int, list[dict[int, float]]] = {}
    last: dict[int, ipc.SeqDelta] = {}
    spans: dict[int, list[tuple[int, str]]] = {}
    for u in updates:
        for d in u.seqs:
            texts.setdefault(d.index, []).append(d.text)
            ids.setdefault(d.index, []).extend(d.token_ids)
            if d.logprobs is not None:
                lps.setdefault(d.index, []).extend(d.logprobs)
            if d.weight_version_spans is not None:
                spans[d.index] = d.weight_version_spans
            last[d.index] = d
    seqs = [ipc.SeqDelta(i, "".join(texts[i]), ids[i], lps.get(i), last[i].finish_reason, last[i].stop_reason,
                         spans.get(i)) for i in sorted(last)]
    a, b = updates[0], updates[-1]
    prompt_logprobs = next((u.prompt_logprobs for u in reversed(updates) if u.prompt_logprobs is not None), None)
    return ipc.Update(b.rid, seqs, b.prompt_tokens or a.prompt_tokens, b.cached_tokens or a.cached_tokens,
                      b.finished, None, b.status, prompt_logprobs)


def coalesce(item: ipc.Update | Exception, q: asyncio.Queue[ipc.Update | Exception]
             ) -> tuple[ipc.Update | Exception, ipc.Update | Exception | None]:
    """Merge the updates already queued behind `item` into it. A front end that keeps up sees one
    update per engine step; one that has fallen behind (a burst of new requests, hundreds of streams)
    then writes one chunk per stream for several steps instead of one per step, so it catches up
    instead of falling further behind. An error or exception is never merged: it is returned second,
    to be handled on the next turn."""
    if not isinstance(item, ipc.Update) or item.error is not None or item.finished or q.empty():
        return item, None
    batch, held = [item], None
    while not q.empty() and not batch[-1].finished:
        nxt = q.get_nowait()
        if isinstance(nxt, Exception) or nxt.error is not None:
            held = nxt
            break
        batch.append(nxt)
    return (merge_updates(batch) if len(batch) > 1 else item), held


class EngineClient:
    def __init__(self, config: EngineConfig, startup_timeout_s: float = 900.0) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.info: dict[str, Any] = {}
        self.tokenizer: Any = None
        self.dead = False
        self.dead_reason = ""
        self._streams: dict[str, asyncio.Queue[ipc.Update | Exception]] = {}
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._qids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.on_update: Callable[[str, ipc.Update], None] | None = None    # the metrics hook
        # The engine's weight version, as its last answer said: every change goes through admin(), whose
        # answers carry it, so responses can report it without a round trip.
        self.weight_version = "default"

    # ---- lifecycle ----
    async def start(self) -> None:
        from rlserve.models.loader import load_tokenizer, resolve_model
        source = await asyncio.to_thread(resolve_model, self.config.model, self.config.load_format)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.config.tokenizer or source.tokenizer_dir)
        self._dir = tempfile.mkdtemp(prefix="rlserve-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self.ctx = zmq.asyncio.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind(in_addr)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        self.pull.bind(out_addr)
        mp = multiprocessing.get_context("spawn")
        self.proc = proc = mp.Process(target=run_engine, args=(self.config, in_addr, out_addr),
                                      name="rlserve-engine", daemon=True)
        proc.start()
        await self._wait_ready(proc)
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._watch_loop())]

    async def _wait_ready(self, proc: multiprocessing.process.BaseProcess) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if await self.pull.poll(500):
                ev = ipc.event_decoder.decode(await self.pull.recv())
                if isinstance(ev, ipc.Failed):
                    await self.close()
                    raise RuntimeError(f"the engine failed to start: {ev.message}")
                if isinstance(ev, ipc.Ready):
                    self.info = ev.info
                    self.weight_version = str(ev.info.get("weight_version", "default"))
                    return
            elif not proc.is_alive():
                await self.close()
                raise RuntimeError(f"the engine process exited during startup (code {proc.exitcode})")
        await self.close()
        raise RuntimeError("the engine did not start in time")

    async def close(self, timeout_s: float = 10.0) -> None:
        for t in self._tasks:
            t.cancel()
        if self.proc is not None and self.proc.is_alive():
            try:
                await self.push.send(ipc.encoder.encode(ipc.Shutdown()))
            except zmq.ZMQError:
                pass
            deadline = time.monotonic() + timeout_s
            while self.proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
        self.push.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _mark_dead(self, reason: str) -> None:
        if self.dead:
            return
        self.dead, self.dead_reason = True, reason
        log.error("engine is dead: %s", reason)
        err = EngineDeadError(reason)
        for q in self._streams.values():
            q.put_nowait(err)
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(err)

    async def _watch_loop(self) -> None:
        proc = self.proc
        assert proc is not None, "started by start()"
        while not self.dead:
            if not proc.is_alive():
                self._mark_dead(f"the engine process exited (code {proc.exitcode})")
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _recv_loop(self) -> None:
        while True:
            ev = ipc.event_decoder.decode(await self.pull.recv())
            if isinstance(ev, ipc.Updates):
                for u in ev.items:
                    q = self._streams.get(u.rid)
                    if q is not None:
                        q.put_nowait(u)
            elif isinstance(ev, ipc.Reply):
                fut = self._replies.pop(ev.qid, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev.data)

    # ---- requests ----
    def check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError(self.dead_reason)

    async def _send(self, msg: ipc.Command) -> None:
        self.check_alive()
        await self.push.send(ipc.encoder.encode(msg))

    async def generate(self, rid: str, prompt_ids: list[int], params: dict[str, Any],
                       prompt: str | None = None, pooling: dict[str, Any] | None = None
                       ) -> AsyncGenerator[ipc.Update, None]:
        self.check_alive()
        if rid in self._streams:
            raise RequestFailed(f"request id {rid!r} is already in use")
        q: asyncio.Queue[ipc.Update | Exception] = asyncio.Queue()
        self._streams[rid] = q
        finished = False
        try:
            await self._send(ipc.AddRequest(rid, prompt_ids, params, prompt, pooling))
            held: ipc.Update | Exception | None = None
            while True:
                item = held if held is not None else await q.get()
                item, held = coalesce(item, q)
                if isinstance(item, Exception):
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestFailed(item.error, item.status)
                if self.on_update is not None:
                    self.on_update(rid, item)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished and not self.dead:
                try:
                    await self.push.send(ipc.encoder.encode(ipc.Abort(rid)))
                except zmq.ZMQError:
                    pass

    async def collect(self, rid: str, prompt_ids: list[int], params: dict[str, Any],
                      prompt: str | None = None) -> RequestResult:
        res = RequestResult(rid, prompt_ids, [SeqState() for _ in range(params.get("n", 1))])
        async for u in self.generate(rid, prompt_ids, params, prompt):
            res.apply(u)
        return res

    async def abort(self, rid: str | None) -> None:
        await self._send(ipc.Abort(rid))

    async def query(self, what: str, timeout_s: float = 10.0) -> dict[str, Any]:
        self.check_alive()
        qid = next(self._qids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[qid] = fut
        try:
            await self._send(ipc.Query(qid, what))
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._replies.pop(qid, None)

    async def admin(self, op: str, args: dict[str, Any], timeout_s: float = ADMIN_TIMEOUT_S) -> dict[str, Any]:
        """Run an admin operation in the engine process (server/admin_ops.py) and return its answer."""
        self.check_alive()
        qid = next(self._qids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[qid] = fut
        try:
            await self._send(ipc.Admin(qid, op, args))
            data = await asyncio.wait_for(fut, timeout_s)
        finally:
            self._replies.pop(qid, None)
        if "weight_version" in data:
            self.weight_version = str(data["weight_version"])
        return data

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- tokenizer side ----
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestFailed("this model has no tokenizer: send token ids instead of text")
        try:
            # Like LLM.encode: rendered chat prompts already carry their special tokens.
            return self.tokenizer.encode(text, add_special_tokens=False)
        except Exception as e:   # e.g. lone surrogates the tokenizer cannot encode
            raise RequestFailed(f"cannot tokenize the text: {e}") from e

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            raise RequestFailed("this model has no tokenizer")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise RequestFailed("this model's tokenizer has no chat template")
        try:
            return tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:   # template errors (raise_exception, bad roles) belong to the request
            raise RequestFailed(f"cannot apply the chat template: {e}") from e

    def check_prompt(self, ids: list[int]) -> None:
        """The engine checks these too; checking here gives clear 400s without a round trip."""
        if not ids:
            raise RequestFailed("the prompt is empty: at least one token is required", 400)
        vocab = self.info["vocab_size"]
        lo, hi = min(ids), max(ids)          # two C-level passes; a Python loop costs ~0.1 ms a 2k prompt
        if lo < 0 or hi >= vocab:
            t = lo if lo < 0 else hi
            raise RequestFailed(f"token id {t} is out of range for a vocabulary of {vocab}")
        limit = self.info["max_model_len"]
        if len(ids) >= limit:
            raise RequestFailed(f"this model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(ids)} tokens (room is needed for at least one new token)")

