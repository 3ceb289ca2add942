"""The training loop end to end on a tiny model: it runs, logs every step, and evaluates on schedule."""
from __future__ import annotations

import json

from rlserve.rl.config import load_config
from rlserve.rl.train import train


def test_train_loop_logs_and_evaluates(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"model.path={tiny_model_dir('tiny-llama')}", "steps=3", f"output_dir={tmp_path}",
                             "task.prompts_per_step=2", "task.eval_prompts=4", "task.eval_every=3",
                             "rollout.group_size=4", "rollout.max_tokens=6", "optim.lr=1e-3"])
    history = train(cfg)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2] == [r["step"] for r in history]
    assert "eval_accuracy" in lines[2] and "eval_accuracy" not in lines[0]
    assert 0.0 <= lines[2]["eval_accuracy"] <= 1.0
    assert all(0.0 <= r["reward"] <= 1.0 for r in lines)
    assert json.loads((tmp_path / "config.json").read_text())["rollout"]["group_size"] == 4
