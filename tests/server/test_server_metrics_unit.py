"""Metrics bookkeeping without a server: finished requests count by reason; abandoned ones as aborts."""
from __future__ import annotations

from rlserve.server import ipc
from rlserve.server.metrics import Metrics


def count(m: Metrics, reason: str) -> float:
    return m.requests.labels(m.model_name, reason)._value.get()


def test_finished_requests_count_once_and_abandoned_ones_as_aborts():
    m = Metrics("test-model")
    m.start("done")
    m.on_update("done", ipc.Update(rid="done", seqs=[ipc.SeqDelta(index=0, text="ab", token_ids=[1, 2], finish_reason="stop")],
                                   prompt_tokens=3, finished=True))
    m.forget("done")
    assert count(m, "stop") == 1 and count(m, "abort") == 0
    m.start("gone")
    m.on_update("gone", ipc.Update(rid="gone", seqs=[ipc.SeqDelta(index=0, text="c", token_ids=[4])]))
    m.forget("gone")          # the client disconnected mid-generation
    assert count(m, "abort") == 1
