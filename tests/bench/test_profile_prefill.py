"""The prefill profiler prefills every prompt in chunks of the configured size and leaks no KV."""
from __future__ import annotations

import math

from benchmarks import profile_prefill
from rlserve.bench.workload import make_workload


def test_each_round_prefills_every_prompt_in_chunks(capsys):
    rounds = profile_prefill.main(["--model", "tiny-qwen3", "--device", "cpu", "--num-prompts", "5",
                                   "--max-input", "40", "--vocab", "200", "--chunked-prefill-size", "32",
                                   "--rounds", "2", "--trace"])
    tokens = sum(len(p) for p in make_workload(num_prompts=5, min_input=40, max_input=40,
                                               max_token_id=200).prompt_token_ids)
    out = capsys.readouterr().out
    assert len(rounds) == 2
    for steps in rounds:
        # a step prefills at most 32 prompt tokens; the prompts are 40 tokens each
        assert len(steps) >= math.ceil(tokens / 32) and all(s > 0 for s in steps)
    assert f"{tokens:,} prompt tokens in {len(rounds[0])} steps" in out
    assert "kv leaked: 0" in out
    assert "Self CPU" in out     # the profiler's table
