"""The loop's guards on the toy task: a non-finite reward stops the run (or drops its group), the last
step always gets a checkpoint, a resume refuses a config that changes training, and checkpoints load
with weights-only unpickling."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from rl_toy import share_of_a, toy_config, toy_prompts, toy_train

from rlserve.rl.checkpoint import (
    RESUMABLE_KEYS,
    check_resume_config,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from rlserve.rl.config import load_config, to_dict
from rlserve.rl.train import train

SMALL = ("task.prompts_per_step=2", "rollout.group_size=4", "rollout.max_tokens=10")


def _nan_for_the_third_sample_of_each_step():
    calls = [0]

    def reward(prompt: str, completion: str, **fields: Any) -> float:
        calls[0] += 1
        return math.nan if calls[0] % 8 == 3 else share_of_a(prompt, completion)
    return reward


def _train_with(model_dir: Path, out: Path, reward, *overrides: str) -> list[dict[str, Any]]:
    cfg = toy_config(model_dir, out, *SMALL, *overrides)
    return train(cfg, reward_fn=reward, prompts=toy_prompts(cfg.seed))


def test_a_nan_reward_stops_the_run_naming_the_sample(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"reward of sample 2 is nan .*prompt '.+'.*on_invalid_reward=drop"):
        _train_with(tiny_model_dir("tiny-llama"), tmp_path, _nan_for_the_third_sample_of_each_step(), "steps=1")


def test_a_nan_reward_drops_its_group_when_configured(tiny_model_dir, tmp_path):
    history = _train_with(tiny_model_dir("tiny-llama"), tmp_path, _nan_for_the_third_sample_of_each_step(),
                          "steps=2", "task.on_invalid_reward=drop")
    assert [r["groups_invalid_reward"] for r in history] == [1, 1]
    assert [r["groups_kept"] for r in history] == [1, 1]
    for r in history:
        assert all(math.isfinite(r[k]) for k in ("reward", "pg_loss", "loss", "grad_norm")), r


def test_the_last_step_is_checkpointed_and_a_resume_checks_the_config(tiny_model_dir, tmp_path):
    model = tiny_model_dir("tiny-llama")
    toy_train(model, tmp_path, *SMALL, "steps=3", "checkpoint_every=2", "checkpoint_keep=3")
    # steps is not a multiple of checkpoint_every: the final state is saved too
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000002"]
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])["next_step"] == 3

    # a change in what training computes is refused, listing every differing key with both values
    with pytest.raises(ValueError, match=r"config differs in optim\.lr, rollout\.temperature \(optim\.lr: 0\.01 "
                                         r"in the checkpoint, 0\.02 now; rollout\.temperature: 1\.0 .*, 0\.7 now\)"):
        toy_train(model, tmp_path, *SMALL, "steps=4", "checkpoint_every=2", "checkpoint_keep=3", "resume=true",
                  "optim.lr=2e-2", "rollout.temperature=0.7")
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])["next_step"] == 3      # nothing was written

    # length, checkpointing and logging may change
    history = toy_train(model, tmp_path, *SMALL, "steps=4", "checkpoint_every=5", "checkpoint_keep=2",
                        "resume=true", "logging.plot_every=1")
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]


def test_check_resume_config_allows_only_the_documented_keys():
    saved = to_dict(load_config(None, []))
    same = to_dict(load_config(None, ["steps=99", "resume=true", "output_dir=elsewhere", "checkpoint_every=7",
                                      "checkpoint_keep=1", "task.eval_every=0", "logging.tensorboard=true"]))
    check_resume_config(saved, same, "ckpt")
    assert {"steps", "checkpoint_every", "logging.*"} <= set(RESUMABLE_KEYS)
    changed = to_dict(load_config(None, ["seed=1", "algorithm.dual_clip=3", "model.dtype=bfloat16"]))
    with pytest.raises(ValueError, match=r"differs in algorithm\.dual_clip, model\.dtype, seed "):
        check_resume_config(saved, changed, "ckpt")
    # a key the checkpoint predates counts as its default; a checkpoint without a config is not checked
    older = {k: v for k, v in saved.items() if k != "algorithm"} | {
        "algorithm": {k: v for k, v in saved["algorithm"].items() if k != "dual_clip"}}
    check_resume_config(older, saved, "ckpt")
    check_resume_config(None, changed, "ckpt")


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)


def test_checkpoints_load_weights_only(tmp_path):
    marker = tmp_path / "unpickled"
    path = save_checkpoint(tmp_path / "run", 0, {"next_step": 1, "evil": _RunsCodeWhenUnpickled(marker)})
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_checkpoint(path)
    assert not marker.exists()
    # what the loop saves is tensors, numbers, strings and plain containers (a real one loads above)
    import random
    plain = {"rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, "history": [{"a": 1.0}]}
    path = save_checkpoint(tmp_path / "run", 1, plain)
    assert load_checkpoint(path)["rng"]["python"] == random.getstate()
