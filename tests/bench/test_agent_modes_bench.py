"""benchmarks/agent_modes.py: the modes become the right overrides, and a run's metrics.jsonl becomes
samples/s, per-step means and accuracy as documented (in-loop evaluation left out of the wall time)."""
from __future__ import annotations

import json

import pytest

from benchmarks import agent_modes


def test_modes_become_overrides_and_bad_ones_are_refused():
    assert agent_modes.mode_args("off", 1) == ["asynchronous.mode=off"]
    assert agent_modes.mode_args("full:4x8", 2) == [
        "asynchronous.mode=full", "asynchronous.max_staleness=2", "asynchronous.producers=4",
        "asynchronous.groups_in_flight=8"]
    assert agent_modes.mode_args("full:4x8:3", 1)[1] == "asynchronous.max_staleness=3"   # this mode's own bound
    assert agent_modes.mode_args("full:4x8:2+proc", 1)[-2:] == ["asynchronous.groups_in_flight=8",
                                                               "asynchronous.rollout_process=true"]
    assert agent_modes.mode_args("one_step_off+proc", 1) == ["asynchronous.mode=one_step_off",
                                                            "asynchronous.rollout_process=true"]
    for bad in ("full", "full:4", "fast:4x8", "full:ax8", "full:4x8:", "full:4x8:s", "full:4x8:1:2", "off+proc", "full:4x8+p"):
        with pytest.raises(ValueError, match="full:PxG"):
            agent_modes.mode_args(bad, 1)
    with pytest.raises(ValueError, match="full:PxG"):            # refused before any run starts
        agent_modes.main(["--modes", "off", "full:x", "--out", "unused"])


def _write(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_of_logged_runs(tmp_path, capsys):
    _write(tmp_path / "off", [
        {"step": -1, "eval_accuracy": 0.25, "eval_s": 3.0},
        {"step": 0, "rollout_s": 2.0, "logprob_s": 0.5, "update_s": 1.0, "push_s": 0.1, "total_s": 3.7,
         "elapsed_s": 3.7},
        {"step": 1, "rollout_s": 1.0, "logprob_s": 0.5, "update_s": 1.0, "total_s": 4.5, "eval_s": 2.0,
         "eval_accuracy": 0.75, "elapsed_s": 8.2}])
    _write(tmp_path / "full-2x4", [
        {"step": 0, "rollout_wait_s": 1.0, "logprob_s": 0.5, "update_s": 1.0, "total_s": 2.5, "elapsed_s": 2.5,
         "groups_dropped_stale": 2},
        {"step": 1, "rollout_wait_s": 0.0, "logprob_s": 0.5, "update_s": 1.0, "total_s": 1.5, "elapsed_s": 4.0,
         "groups_dropped_stale": 1}])
    off = agent_modes.summarize("off", tmp_path / "off" / "metrics.jsonl", 10)
    assert off.steps == 2 and off.seconds == pytest.approx(6.2) and off.samples_per_s == pytest.approx(20 / 6.2)
    assert off.parts == pytest.approx({"rollout_s": 1.5, "rollout_wait_s": 0.0, "logprob_s": 0.5, "update_s": 1.0,
                                       "rest_s": 0.05})
    assert off.accuracy == [0.25, 0.75] and off.dropped == 0
    assert agent_modes.main(["--summarize", str(tmp_path), "--modes", "off", "full:2x4",
                             "--samples-per-step", "10"]) == 0
    out = capsys.readouterr().out
    assert "| off | 25.0% → 75.0% | 2 | 6.2 s | 3.2 | 1.00 |" in out
    assert "| full:2x4 | — | 2 | 4.0 s | 5.0 | 1.55 | 0.00, 0.50, 0.50, 1.00, 0.00 s | 3 |" in out
