"""One colocated GRPO step, top to bottom: rollout with the engine → rewards → group advantages →
clipped policy update on the very module the engine serves from (no weight copy) → drop stale cache.

The engine's model *is* the trainer's model here, so the update is visible to the next rollout at
once. This is the minimal loop; config files, checkpoints and evaluation build on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlserve.llm import LLM
from rlserve.rl.algorithms import group_advantages, policy_loss
from rlserve.rl.logprobs import completion_logprobs
from rlserve.rl.rewards import RewardFn, score_batch
from rlserve.sampling import SamplingParams


@dataclass
class GRPOConfig:
    group_size: int = 8
    max_tokens: int = 16
    temperature: float = 1.0
    lr: float = 1e-3
    clip_low: float = 0.2
    clip_high: float = 0.28
    loss_agg: str = "token-mean"
    normalize_std: bool = True
    constraint: dict[str, Any] | None = None   # e.g. {"regex": "[ab]{8}"}: structured rollouts


@dataclass
class StepStats:
    reward_mean: float
    loss: float
    clip_fraction: float
    logprob_mismatch: float    # mean |engine logprob - trainer logprob| of the sampled tokens


def pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return out, mask


def grpo_step(llm: LLM, optimizer: torch.optim.Optimizer, cfg: GRPOConfig, prompts: list[list[int]],
              reward_fn: RewardFn, fields: list[dict[str, Any]], seed: int) -> StepStats:
    model = llm.engine.model
    # 1. rollout: n samples per prompt, keeping the engine's logprobs of what it sampled
    params = SamplingParams(n=cfg.group_size, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                            seed=seed, logprobs=0, ignore_eos=cfg.constraint is None, **(cfg.constraint or {}))
    outs = llm.generate(prompts, params, use_tqdm=False)
    samples = [(p, o.prompt, c) for p, o in zip(prompts, outs) for c in o.outputs]
    # 2. rewards and group-normalised advantages
    texts = [c.text for _, _, c in samples]
    rewards = torch.tensor(score_batch(reward_fn, [o or "" for _, o, _ in samples], texts,
                                       [f for f in fields for _ in range(cfg.group_size)]))
    adv = group_advantages(rewards, cfg.group_size, normalize_std=cfg.normalize_std)
    # 3. policy update on the served module (one minibatch: old policy == rollout policy)
    old = [torch.tensor([next(iter(d.values())) for d in c.logprobs]) for _, _, c in samples]
    model.train()
    new = completion_logprobs(model, [p for p, _, _ in samples], [c.token_ids for _, _, c in samples],
                              cfg.temperature)
    logp, mask = pad(new)
    old_logp, _ = pad(old)
    # One minibatch straight after rollout: the old policy is the current one. The engine's logprobs
    # are the behaviour policy's and only feed the mismatch monitor (a grammar mask changes them).
    loss, metrics = policy_loss(logp, logp.detach(), adv, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                agg=cfg.loss_agg)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    # 4. the engine already sees the new weights; its cached KV is stale
    llm.engine.flush_cache()
    mismatch = ((logp.detach() - old_logp).abs() * mask).sum() / mask.sum()
    return StepStats(rewards.mean().item(), loss.item(), float(metrics["clip_fraction"]), mismatch.item())
