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


def test_inter_token_latency_histogram_counts_every_token():
    from prometheus_client import generate_latest

    m = Metrics("test-model")
    m.itl.observe(0.004)            # <= 0.005
    m.itl.observe(0.005)            # on a bound: counted there
    m.itl.observe(0.02, times=3)    # a chunk of 3 tokens, 20 ms apart each
    m.itl.observe(500.0)            # past the last bound: +Inf only
    text = generate_latest(m.registry).decode()
    lines = {l.split(" ")[0]: float(l.split(" ")[1]) for l in text.splitlines()
             if l.startswith("rlserve_inter_token_latency_seconds")}
    key = 'rlserve_inter_token_latency_seconds_bucket{le="%s",model_name="test-model"}'
    assert lines[key % "0.005"] == 2 and lines[key % "0.01"] == 2 and lines[key % "0.025"] == 5
    assert lines[key % "120.0"] == 5 and lines[key % "+Inf"] == 6
    assert lines['rlserve_inter_token_latency_seconds_count{model_name="test-model"}'] == 6
    assert abs(lines['rlserve_inter_token_latency_seconds_sum{model_name="test-model"}'] - 500.069) < 1e-9
