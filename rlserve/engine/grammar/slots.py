"""The shared-memory segment the engine and its grammar mask helpers share: the bitmask rows, then one
answer slot per helper on a 64-byte boundary."""
from __future__ import annotations

import os
import platform

import numpy as np

# Each helper's answer slot: the step it last answered, its seconds advancing matchers and filling rows
# in that step (as ns), and 0 or 1 if it sent an error. A helper that fails sets FAILED and leaves DONE:
# a device waiting on DONE must not read its rows.
DONE, ACCEPT_NS, FILL_NS, FAILED = range(4)
# Another process sees a helper's stores to shared memory in the order it made them on x86 only. Where
# they may be reordered (ARM), a helper also sends an empty message after writing its slot: the
# system calls on both sides order the slot and the mask rows before the engine reads them.
# RLSERVE_GRAMMAR_HELPER_NOTIFY=1 takes that path anywhere.
STORES_IN_ORDER = (platform.machine().lower() in ("x86_64", "amd64")
                   and os.environ.get("RLSERVE_GRAMMAR_HELPER_NOTIFY") != "1")


def slots_offset(max_rows: int, words: int) -> int:
    return -(-max_rows * words * 4 // 64) * 64


def answer_slots(buf: memoryview | None, max_rows: int, words: int, count: int) -> np.ndarray:
    """The helpers' answer slots [count, 4] int64, placed after the bitmask (on a 64-byte boundary).
    A helper writes its slot's DONE last, so an engine that reads DONE first sees the rest and the
    helper's mask rows (see STORES_IN_ORDER)."""
    return np.ndarray((count, 4), dtype=np.int64, buffer=buf, offset=slots_offset(max_rows, words))


def segment_size(max_rows: int, words: int, count: int) -> int:
    return slots_offset(max_rows, words) + count * 4 * 8
