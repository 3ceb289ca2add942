"""The training loop end to end on a tiny model: it runs, logs every step with its time breakdown,
evaluates on schedule, plots, and reads prompts from dataset files."""
from __future__ import annotations

import json

from rlserve.rl.config import load_config
from rlserve.rl.train import train

SMALL = ["steps=3", "task.prompts_per_step=2", "task.eval_prompts=4", "task.eval_every=3", "rollout.group_size=4",
         "rollout.max_tokens=6", "optim.lr=1e-3", "logging.progress_bar=false"]


def test_train_loop_logs_and_evaluates(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"model.path={tiny_model_dir('tiny-llama')}", f"output_dir={tmp_path}", *SMALL,
                             "logging.tensorboard=true", "logging.plot_every=2"])
    history = train(cfg)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [-1, 0, 1, 2] == [r["step"] for r in history]
    before, lines = lines[0], lines[1:]          # step −1: held-out accuracy before any update
    assert set(before) == {"step", "eval_accuracy", "eval_s"} and 0.0 <= before["eval_accuracy"] <= 1.0
    assert "eval_accuracy" in lines[2] and "eval_accuracy" not in lines[0]
    assert 0.0 <= lines[2]["eval_accuracy"] <= 1.0
    assert all(0.0 <= r["reward"] <= 1.0 for r in lines)
    for r in lines:
        parts = r["rollout_s"] + r["logprob_s"] + r["update_s"] + r["sync_s"] + r.get("eval_s", 0.0)
        assert 0 < parts <= r["total_s"]
        assert {"mismatch_abs", "mismatch_kl", "grad_norm", "clip_fraction", "entropy", "response_length",
                "groups_kept", "solve_rate", "prompts_sha1"} <= set(r)
    assert json.loads((tmp_path / "config.json").read_text())["rollout"]["group_size"] == 4
    assert (tmp_path / "metrics.png").stat().st_size > 0
    assert any((tmp_path / "tensorboard").iterdir())


def test_train_from_dataset_files(tiny_model_dir, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "answer": a + 1} for a in range(5)]
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_file.write_text("".join(json.dumps({"prompt": f"{a} + 2 =", "answer": a + 2}) + "\n" for a in range(3)))
    cfg = load_config(None, [f"model.path={tiny_model_dir('tiny-llama')}", f"output_dir={tmp_path / 'run'}", *SMALL,
                             f"task.dataset={train_file}", f"task.eval_dataset={eval_file}"])
    history = [r for r in train(cfg) if r["step"] >= 0]
    # 3 steps × 2 prompts from the 5 rows (order: see test_loop_parts), held-out accuracy from the eval file
    assert len({r["prompts_sha1"] for r in history}) == 3
    assert "eval_accuracy" in history[2]
