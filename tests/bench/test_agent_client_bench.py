"""benchmarks/agent_client.py runs a small agentic rollout against its stand-in server: every sample
takes its two turns and one sandbox call, its samples spread over several connection pools."""
from __future__ import annotations

import pytest

from benchmarks import agent_client
from rlserve.rl.agent import backend


@pytest.mark.parametrize("per_pool", [2])          # three pools of two samples
def test_agent_client_bench_runs_every_sample_to_its_answer(capsys, monkeypatch, tokenizer_dir, per_pool):
    monkeypatch.setattr(backend, "SAMPLES_PER_POOL", backend.SAMPLES_PER_POOL)   # restored after
    assert agent_client.main(["--samples", "6", "--repeat", "1", "--samples-per-pool", str(per_pool),
                              "--tokenizer", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert f"samples per pool: {per_pool}" in out and "12 turns, 6/6 finished" in out
