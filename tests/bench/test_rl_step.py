"""The RL step benchmark runs the real loop end to end on a tiny random model and reports every phase."""
from __future__ import annotations

import json

from benchmarks import rl_step


def test_rl_step_bench_reports_each_phase(tmp_path, capsys):
    out = tmp_path / "rl.jsonl"
    assert rl_step.main(["--model", "tiny-qwen3", "--dtype", "float32", "--device", "cpu", "--prompts", "2",
                         "--group-size", "2", "--max-tokens", "6", "--prompt-len", "5", "--prompt-vocab", "200",
                         "--steps", "2", "--micro-batch", "2", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["steps"]) == 2
    for step in result["steps"]:
        for phase in ("rollout_s", "logprob_s", "update_s"):
            assert step[phase] > 0
        assert step["total_s"] >= step["rollout_s"] + step["logprob_s"] + step["update_s"]
    median = result["median_after_first"]
    assert median["rollout_tok_per_s"] == 2 * 2 * 6 / median["rollout_s"]
    sync = result["weight_sync"]
    assert sync["weights_gb"] > 0 and sync["update_weights_ms"] > 0
    assert "update_weights" in capsys.readouterr().out
