"""Grammar masks filled by helper processes while the engine loop does the step's other host work.

xgrammar holds the GIL while it advances a matcher or fills a mask, so a thread cannot run it beside
the loop's Python (stop checks, detokenizing). A helper process can. Each helper keeps copies of the
matchers it is given (see GrammarBackend.helper_share for how many; helper key % n picks which): the
engine sends the tokens those accept and the next batch's rows, the helpers advance their copies and
write their rows of one bitmask in shared memory while the engine fills any rows of its own, and the
engine copies the whole mask to the device when it launches the sampling. The engine's own matchers
for those rows lag behind: they take their tokens only when read (Constraints catches them up), when
the engine must fill the rows itself; a stop token sampled under a helper's mask ends its request at once.

A helper runs `python -m rlserve.engine.grammar.worker` (not multiprocessing's spawn, which would
re-run the caller's main script) and talks over a socket pair. If one fails, the engine drops them
all and fills the masks itself, catching its matchers up first.
"""
from __future__ import annotations

import logging
import pickle
import socket
import struct
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from rlserve.engine.grammar.slots import (
    ACCEPT_NS,
    DONE,
    FAILED,
    FILL_NS,
    STORES_IN_ORDER,
    answer_slots,
    segment_size,
    slots_offset,
)

log = logging.getLogger("rlserve")
# How long the helper polls for the next request before sleeping (GPU engines only, whose steps come
# every few milliseconds; it keeps one core busy while requests flow).
SPIN_S = 0.005
STARTUP_TIMEOUT_S = 120.0   # for a helper to import xgrammar and take its first message
RESULT_TIMEOUT_S = 10.0     # a helper this late is stuck: the engine stops using it and fills masks itself
__all__ = ["MaskHelpers", "STORES_IN_ORDER"]


@dataclass
class _Helper:
    """One helper process and the grammar events queued for it since its last request."""
    proc: subprocess.Popen
    conn: Connection
    accept_s: float = 0.0                                      # its time advancing matchers, all steps
    fill_s: float = 0.0                                        # its time filling rows, all steps
    known: set[int] = field(default_factory=set)            # grammar ids it has been sent
    new_grammars: list[tuple[int, str]] = field(default_factory=list)
    new_matchers: list[tuple[int, int]] = field(default_factory=list)
    accepted: list[tuple[int, int]] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    ready: bool = False                                        # it has said it started
    asked: bool = False                                        # a request awaits its answer


class MaskHelpers:
    """The engine's side of one or more helper processes that fill rows of one shared bitmask: queue
    grammar events, ask for a batch's masks, wait for them. A matcher key belongs to helper key % n."""

    def __init__(self, count: int, tokenizer_info_json: str, stop_ids: list[int], max_rows: int, words: int,
                 pin: bool) -> None:
        self.max_rows = max_rows
        self._shm = SharedMemory(create=True, size=segment_size(max_rows, words, count))
        # The helpers' bitmask, pinned when it feeds a GPU so the copy to the device is asynchronous.
        self.bitmask = torch.frombuffer(self._shm.buf, dtype=torch.int32, count=max_rows * words).view(max_rows, words)
        self._answers = answer_slots(self._shm.buf, max_rows, words, count)
        self._answers[:] = 0
        self._pinned = pin and _register(self.bitmask.data_ptr(), segment_size(max_rows, words, count))
        # Where the device can wait for the answer slots itself, a batch's mask copy and sampling can be
        # queued before the helpers are done (wait_on_device).
        self._slot_addresses = self._device_slots() if self._pinned and STORES_IN_ORDER else None
        self._step = 0                                 # numbers the requests; a helper answers by it
        self._helpers: list[_Helper] = []
        for index in range(count):
            ours, theirs = socket.socketpair()
            _send_timeout(ours.fileno(), STARTUP_TIMEOUT_S)    # the first message waits for the helper to start
            proc = subprocess.Popen(
                [sys.executable, "-m", "rlserve.engine.grammar.worker", str(theirs.fileno()), self._shm.name,
                 str(max_rows), str(words), str(SPIN_S if pin else 0.0), str(index), str(count)],
                pass_fds=(theirs.fileno(),))
            theirs.close()
            conn = Connection(ours.detach())
            conn.send((tokenizer_info_json, list(stop_ids)))
            # From now on a send to a helper that stopped reading (stuck, or suspended) would block the
            # engine once the socket's buffer is full: time it out like an answer, so the helper is given up.
            _send_timeout(conn.fileno(), RESULT_TIMEOUT_S)
            self._helpers.append(_Helper(proc, conn))
        self._grammar_ids: dict[Any, int] = {}        # spec → id the helpers know it by
        self.requests = 0                              # batches they were asked to fill
        self._finalizer = weakref.finalize(self, _shut_down, [h.conn for h in self._helpers],
                                           [h.proc for h in self._helpers], self._shm,
                                           self.bitmask.data_ptr() if self._pinned else None,
                                           slots_offset(max_rows, words))

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def count(self) -> int:
        return len(self._helpers)

    def pids(self) -> tuple[int, ...]:
        return tuple(h.proc.pid for h in self._helpers)

    def _device_slots(self) -> list[int] | None:
        from rlserve.engine.grammar.stream_wait import StreamWaiter
        waiter = StreamWaiter.load()
        if waiter is None:
            return None
        base = self._answers.ctypes.data
        found = [waiter.device_address(base + (i * 4 + DONE) * 8) for i in range(len(self._answers))]
        addresses = [a for a in found if a is not None]
        if len(addresses) < len(found):
            return None
        stream = torch.cuda.current_stream()
        if not all(waiter.wait(stream, a, 0) for a in addresses):     # already true: a probe
            return None
        stream.synchronize()
        self._waiter = waiter
        return addresses

    def waits_on_device(self) -> bool:
        """Whether wait_on_device can be used."""
        return self._slot_addresses is not None

    def wait_on_device(self, stream: torch.cuda.Stream) -> bool:
        """Queue on `stream` a wait for every helper's answer to the last request: work queued after it
        (the mask's copy, the sampling) runs once the rows are written. Call result() later all the
        same: a helper that fails never answers, and result() fills its rows (see release_device)."""
        assert self._slot_addresses is not None
        return all(self._waiter.wait(stream, a, self._step) for a in self._slot_addresses)

    def release_device(self) -> None:
        """Answer the last request in every slot, as if each helper had: the engine wrote the rows."""
        self._answers[:, DONE] = self._step

    def ready(self) -> bool:
        """Whether every helper has started; until then the engine fills masks itself (events queue
        up and reach a helper with its first request). Raises if one failed to start."""
        for h in self._helpers:
            if not h.ready and h.conn.poll():
                reply = h.conn.recv()
                if reply != "ready":
                    raise RuntimeError(f"grammar mask helper failed to start: {reply}")
                h.ready = True
        return all(h.ready for h in self._helpers)

    def add(self, key: int, spec: Any, compiled: Any) -> None:
        h = self._helpers[key % len(self._helpers)]
        gid = self._grammar_ids.setdefault(spec, len(self._grammar_ids))
        if gid not in h.known:
            h.known.add(gid)
            h.new_grammars.append((gid, compiled.serialize_json()))
        h.new_matchers.append((key, gid))

    def accepted(self, key: int, token: int) -> None:
        self._helpers[key % len(self._helpers)].accepted.append((key, token))

    def drop(self, key: int) -> None:
        self._helpers[key % len(self._helpers)].dropped.append(key)

    def request(self, keys: list[int | None], took: list[int | None], tokens: list[int]) -> None:
        """Ask for the helpers' rows of one batch's masks (each row's matcher key; None: a row no
        helper fills), after their matchers take `tokens` (took: the key of the matcher each one is
        for, None to skip it) and everything queued since the last request."""
        if len(keys) > self.max_rows:
            raise ValueError(f"{len(keys)} rows exceed the helpers' {self.max_rows}")
        for h in self._helpers:
            if h.new_grammars or h.new_matchers or h.accepted or h.dropped:
                h.conn.send(("events", h.new_grammars, h.new_matchers, h.accepted, h.dropped))
                h.new_grammars, h.new_matchers, h.accepted, h.dropped = [], [], [], []
        # One message for all: each helper picks out its own keys (key % n), so the engine pickles once.
        self._step += 1
        step = pickle.dumps(("step", self._step, took, tokens, keys), protocol=pickle.HIGHEST_PROTOCOL)
        for h in self._helpers:
            h.conn.send_bytes(step)
            h.asked = True
        self.requests += 1

    def result(self) -> None:
        """Wait until every helper has filled its rows of the requested masks (in `bitmask`). The
        engine polls the helpers' answer slots in shared memory: no system call, nothing to unpickle,
        and no wait for the kernel to wake it."""
        for index, h in enumerate(self._helpers):
            if not h.asked:
                continue
            h.asked = False
            slot = self._answers[index]
            if not STORES_IN_ORDER:
                if not h.conn.poll(RESULT_TIMEOUT_S):
                    raise RuntimeError(f"no answer in {RESULT_TIMEOUT_S} s")
                h.conn.recv_bytes()
            elif slot[DONE] != self._step and not slot[FAILED]:
                self._await(h, slot)
            if slot[FAILED]:
                raise RuntimeError(f"grammar mask helper failed: {h.conn.recv() if h.conn.poll(1.0) else '?'}")
            h.accept_s += slot[ACCEPT_NS] * 1e-9
            h.fill_s += slot[FILL_NS] * 1e-9

    def _await(self, h: _Helper, slot: np.ndarray) -> None:
        deadline = time.perf_counter() + RESULT_TIMEOUT_S
        spins = 0
        while slot[DONE] != self._step and not slot[FAILED]:
            spins += 1
            if spins % 1024 == 0:    # every ~0.1 ms: is it still there, and in time?
                if h.proc.poll() is not None:
                    raise RuntimeError(f"exited with code {h.proc.returncode}")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"no answer in {RESULT_TIMEOUT_S} s")

    def busy(self) -> list[tuple[float, float]]:
        """Per helper, seconds spent advancing matchers and filling rows over all requests so far."""
        return [(h.accept_s, h.fill_s) for h in self._helpers]

    def close(self) -> None:
        self._finalizer()

    def abandon(self) -> None:
        """Stop using the helpers at once (one failed, exited or is stuck): kill them instead of waiting
        for them to finish, then release the shared memory."""
        for h in self._helpers:
            if h.proc.poll() is None:
                h.proc.kill()
        self._finalizer()


def _send_timeout(fd: int, seconds: float) -> None:
    """Make a blocking send on the socket `fd` (a Connection's too) fail with an OSError after
    `seconds` instead of waiting for the reader forever."""
    sock = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)     # a duplicate: the option is the socket's
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
    finally:
        sock.close()


def _register(address: int, size: int) -> bool:
    """Page-lock the shared segment (mask rows and answer slots) for asynchronous copies and for the
    device to read; False where CUDA can't."""
    if not torch.cuda.is_available():
        return False
    return int(torch.cuda.cudart().cudaHostRegister(address, size, 0)) == 0  # type: ignore[no-untyped-call]


def _shut_down(conns: list[Connection], procs: list[subprocess.Popen], shm: SharedMemory,
               pinned_ptr: int | None, slots_offset: int) -> None:
    for conn in conns:
        try:
            conn.send(None)
            conn.close()
        except OSError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    if pinned_ptr is not None:
        # Release any device wait still queued on an answer slot, and let queued copies finish, before
        # the memory stops being the device's to read.
        answers = np.ndarray((len(procs), 4), dtype=np.int64, buffer=shm.buf, offset=slots_offset)
        answers[:, DONE] = 1 << 62
        del answers
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            pass
        torch.cuda.cudart().cudaHostUnregister(pinned_ptr)  # type: ignore[no-untyped-call]
    try:
        shm.close()
    except BufferError:
        pass        # a tensor still views the buffer; the segment is unlinked anyway
    shm.unlink()
