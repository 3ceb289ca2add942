"""The step timeline records every engine step of the offline workload, prefill before decode, and
groups the decode steps by batch size."""
from __future__ import annotations

from benchmarks import timeline
from rlserve.bench.workload import make_workload


def test_timeline_records_each_step(capsys):
    records = timeline.main(["--model", "tiny-qwen3", "--num-prompts", "3", "--warmup-prompts", "1",
                             "--show-steps", "2"])
    out = capsys.readouterr().out
    w = make_workload(num_prompts=3)
    prefill = [r for r in records if not r.decode]
    decode = [r for r in records if r.decode]
    assert prefill and decode and records.index(decode[0]) == len(prefill)   # prefill first
    # every decode step but the longest request's last is one token for each running request
    assert len(decode) == max(w.max_tokens) - 1
    assert all(1 <= r.batch <= 3 and r.context_tokens > 0 for r in decode)
    assert decode[0].batch == 3 and decode[-1].batch == 1
    assert "step 0: " in out and "step 1: " in out and "step 2: " not in out
    assert "prefill/mixed steps" in out and "kv leaked: 0" in out
