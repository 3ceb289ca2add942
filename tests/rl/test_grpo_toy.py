"""GRPO on a toy task, colocated: the engine samples "a"/"b" strings (regex-constrained), the reward is
the share of "a", and the policy update on the served module must raise the mean reward clearly."""
from __future__ import annotations

import random

import torch

from rlserve import LLM
from rlserve.rl.grpo import GRPOConfig, grpo_step


def share_of_a(prompt: str, completion: str, **_) -> float:
    return completion.count("a") / 8


def test_grpo_raises_reward_on_a_toy_task(tiny_model_dir):
    torch.manual_seed(0)
    llm = LLM(str(tiny_model_dir("tiny-llama")))
    cfg = GRPOConfig(group_size=8, max_tokens=12, lr=1e-2, constraint={"regex": "[ab]{8}"})
    opt = torch.optim.Adam(llm.engine.model.parameters(), lr=cfg.lr)
    rng = random.Random(0)
    rewards = []
    for step in range(10):
        prompts = [[rng.randint(10, 20000) for _ in range(8)] for _ in range(4)]
        stats = grpo_step(llm, opt, cfg, prompts, share_of_a, [{}] * 4, seed=step)
        rewards.append(stats.reward_mean)
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert start < 0.75 and end > 0.9 and end - start > 0.2, rewards
    assert llm.engine.kv_leaked() == 0
