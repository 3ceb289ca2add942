"""The configured advantage estimator, with the KL-to-reference reward penalty folded into the rewards.

Sequence-level estimators (grpo, rloo) see one reward per completion: the verifier's score minus
coef · Σ_t kl_t. Token-level ones (reinforce++, gae) see the score on the last token and −coef · kl_t on
every token, the usual PPO-RLHF shaping.
"""
from __future__ import annotations

import torch

from rlserve.rl.algorithms import (
    gae,
    group_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    seq_to_token_rewards,
)
from rlserve.rl.config import AlgorithmSection


@torch.no_grad()
def compute_advantages(algo: AlgorithmSection, rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                       kl_penalty: torch.Tensor | None = None, values: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """→ (advantages [N] or [N, T], returns [N, T] for gae else None).

    rewards [N] verifier scores; mask [N, T]; kl_penalty [N, T] = coef · kl_t when kl.mode=reward;
    values [N, T] the critic's (gae only).
    """
    mask = mask.float()
    rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        # one NaN would make its whole group's advantages (and then the loss) NaN without a word
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"non-finite rewards at samples {bad[:8]}: {rewards[bad[:8]].tolist()}")
    if algo.advantage in ("grpo", "rloo"):
        if kl_penalty is not None:
            rewards = rewards - (kl_penalty * mask).sum(-1)
        if algo.advantage == "grpo":
            return group_advantages(rewards, group_size, normalize_std=algo.normalize_std), None
        return rloo_advantages(rewards, group_size), None
    token_rewards = seq_to_token_rewards(rewards, mask)
    if kl_penalty is not None:
        token_rewards = token_rewards - kl_penalty * mask
    if algo.advantage in ("reinforce++", "reinforce++-baseline"):
        baseline = algo.advantage == "reinforce++-baseline"
        return reinforce_pp_advantages(token_rewards, mask, gamma=algo.gamma, baseline=baseline,
                                       group_size=group_size if baseline else None), None
    if algo.advantage == "gae":
        if values is None:
            raise ValueError("gae needs the critic's values")
        adv, returns = gae(token_rewards, values.float(), mask, gamma=algo.gamma, lam=algo.lam)
        # Whitened advantages (standard PPO) keep the policy step size independent of the reward scale;
        # the critic still regresses on the raw returns.
        return masked_whiten(adv, mask), returns
    raise ValueError(f"unknown advantage estimator {algo.advantage!r}")
