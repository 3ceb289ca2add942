"""A grammar mask helper process: `python -m rlserve.engine.grammar.worker FD SHM ROWS WORDS SPIN INDEX COUNT`.

It keeps copies of the matchers the engine gives it, advances them by the tokens each step sends and
writes its rows of the step's bitmask into shared memory (see helpers.py for the engine's side).
"""
from __future__ import annotations

import os
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from rlserve.engine.grammar.slots import ACCEPT_NS, DONE, FAILED, FILL_NS, STORES_IN_ORDER, answer_slots


def _wait(conn: Connection, spin_s: float) -> None:
    """Poll for the next request for up to spin_s before sleeping in the kernel: a step's request
    follows the last one within milliseconds, and waking a sleeping process costs a good part of what
    the helper saves (~0.3 ms a step, measured on an H200 host)."""
    end = time.perf_counter() + spin_s
    while time.perf_counter() < end:
        if conn.poll(0):
            return
    conn.poll(None)


def serve(conn: Connection, shm_name: str, max_rows: int, words: int, spin_s: float, index: int = 0,
          count: int = 1) -> None:
    """The helper's loop: apply grammar events as they come; for each step, advance its matchers by
    their tokens, fill its rows (keys with key % count == index), answer with the seconds those two
    took (or the first error's text, after which the engine stops asking)."""
    torch.set_num_threads(1)    # one core: idle OpenMP workers would spin on cores the engine uses
    try:
        import xgrammar as xgr

        info_json, stop_ids = conn.recv()
        info = xgr.TokenizerInfo.deserialize_json(info_json)
        stop_ids = frozenset(stop_ids)
        shm = SharedMemory(name=shm_name)
        try:   # attaching registered the segment for removal at this process's exit: it is the engine's
            from multiprocessing import resource_tracker
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        except Exception:
            pass
        bitmask = torch.frombuffer(shm.buf, dtype=torch.int32, count=max_rows * words).view(max_rows, words)
        answer = answer_slots(shm.buf, max_rows, words, count)[index]
        filler = xgr.BatchGrammarMatcher(max_threads=1)
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send("ready")
    grammars: dict[int, Any] = {}
    matchers: dict[int, Any] = {}
    terminated: set[int] = set()
    error: str | None = None         # from an events message (which gets no answer of its own)

    def take(key: int, token: int) -> None:
        matcher = matchers.get(key)
        # A rejection leaves the state as the engine's; only a stop token can terminate.
        if matcher is not None and matcher.accept_token(token) and token in stop_ids and matcher.is_terminated():
            terminated.add(key)

    while True:
        try:
            _wait(conn, spin_s)
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        try:
            if msg[0] == "events":
                _, new_grammars, new_matchers, accepted, dropped = msg
                for gid, text in new_grammars:
                    grammars[gid] = xgr.CompiledGrammar.deserialize_json(text, info)
                for key, gid in new_matchers:
                    matchers[key] = xgr.GrammarMatcher(grammars[gid])
                for key, token in accepted:
                    take(key, token)
                for key in dropped:
                    matchers.pop(key, None)
                    terminated.discard(key)
                continue
            _, step, took, tokens, keys = msg
            start = time.perf_counter()
            for key, token in zip(took, tokens):
                if key is not None and key % count == index:
                    take(key, token)
            took_s = time.perf_counter() - start
            # Only this helper's rows: the other helpers and the engine fill the rest meanwhile. A
            # terminated matcher has no next token: its request is finishing and its row is unused.
            mine = [i for i, k in enumerate(keys) if k is not None and k % count == index]
            rows = [i for i in mine if keys[i] in matchers and keys[i] not in terminated]
            if len(rows) < len(mine):
                bitmask[[i for i in mine if keys[i] not in matchers or keys[i] in terminated]] = -1
            if rows:
                filler.batch_fill_next_token_bitmask([matchers[keys[i]] for i in rows], bitmask, rows)
            if error is None:
                answer[ACCEPT_NS] = int(took_s * 1e9)
                answer[FILL_NS] = int((time.perf_counter() - start - took_s) * 1e9)
            _answer(conn, answer, step, error)
        except Exception as e:   # report, don't die silently: the engine falls back to its own fills
            error = error or f"{type(e).__name__}: {e}"
            if msg[0] != "events":
                _answer(conn, answer, msg[1], error)
    del bitmask, answer
    shm.close()


def _answer(conn: Connection, answer: np.ndarray, step: int, error: str | None) -> None:
    if error is not None:
        answer[FAILED] = 1  # and no DONE: a device may be waiting for it to read this helper's rows
    else:
        answer[DONE] = step     # after the rest: the engine reads the slot once this changes
    if not STORES_IN_ORDER:
        conn.send_bytes(b"")
    if error is not None:
        conn.send(error)


if __name__ == "__main__":
    fd, name, rows, width, spin, index, count = sys.argv[1:8]
    serve(Connection(int(fd)), name, int(rows), int(width), float(spin), int(index), int(count))
    os._exit(0)
