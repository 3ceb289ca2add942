"""GRPO on the toy task, colocated: the policy update on the served module must raise the mean
reward clearly within ten steps."""
from __future__ import annotations

from rl_toy import toy_train


def test_grpo_raises_reward_on_a_toy_task(tiny_model_dir, tmp_path):
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path)
    rewards = [r["reward"] for r in history]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert start < 0.75 and end > 0.9 and end - start > 0.2, rewards
    assert all(r["groups_kept"] == 4 for r in history)    # dynamic sampling is off by default
    assert all(r["clip_fraction"] == 0.0 for r in history)   # one minibatch, one epoch: the ratio is 1
