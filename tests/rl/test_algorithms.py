"""Advantage estimators and losses against small cases worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlserve.rl.algorithms import (
    aggregate,
    discounted_returns,
    dynamic_sampling_keep,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- helpers

def test_masked_mean_ignores_padding():
    x = t([1.0, 2.0, 100.0], [3.0, -50.0, -50.0])
    mask = t([1, 1, 0], [1, 0, 0])
    assert_close(masked_mean(x, mask), torch.tensor(2.0))             # (1 + 2 + 3) / 3
    assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 3.0]))


def test_masked_whiten():
    # masked values 1, 2, 3: mean 2, population variance 2/3
    x = t([1.0, 2.0, 9.0], [3.0, 9.0, 9.0])
    mask = t([1, 1, 0], [1, 0, 0])
    s = math.sqrt(2 / 3)
    assert_close(masked_whiten(x, mask), t([-1 / s, 0.0, 0.0], [1 / s, 0.0, 0.0]))
    assert_close(masked_whiten(x, mask, shift_mean=False), t([1 / s, 2 / s, 0.0], [3 / s, 0.0, 0.0]))


# ----------------------------------------------------------------------------- GRPO / RLOO

def test_group_advantages_one_group_of_four():
    # mean 0.5; unbiased std = sqrt((4 · 0.25) / 3) = 0.57735 → ±0.5 / 0.57735 = ±0.866025
    adv = group_advantages(t(1.0, 0.0, 0.0, 1.0), group_size=4, eps=0.0)
    assert_close(adv, t(0.866025, -0.866025, -0.866025, 0.866025))


def test_group_advantages_two_groups_and_eps():
    # groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt(0.5) = 0.707107 → ±0.5 / (0.707107 + 0.1)
    adv = group_advantages(t(1.0, 0.0, 0.0, 1.0), group_size=2, eps=0.1)
    a = 0.5 / (0.707107 + 0.1)
    assert_close(adv, t(a, -a, -a, a))


def test_group_advantages_without_std_and_constant_group():
    adv = group_advantages(t(1.0, 0.0, 0.0, 1.0, 3.0, 3.0), group_size=2, normalize_std=False)
    assert_close(adv, t(0.5, -0.5, -0.5, 0.5, 0.0, 0.0))
    # a constant group has std 0: the eps keeps it finite and the advantage stays 0
    adv = group_advantages(t(3.0, 3.0), group_size=2)
    assert_close(adv, t(0.0, 0.0))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError):
        group_advantages(t(1.0, 0.0, 1.0), group_size=2)


def test_rloo_advantages():
    # [1, 0, 0, 1]: 1 − (0 + 0 + 1)/3 = 2/3 ; 0 − (1 + 0 + 1)/3 = −2/3
    assert_close(rloo_advantages(t(1.0, 0.0, 0.0, 1.0), 4), t(2 / 3, -2 / 3, -2 / 3, 2 / 3))
    # [3, 1, 2]: 3 − 1.5 = 1.5 ; 1 − 2.5 = −1.5 ; 2 − 2 = 0 — then group [5, 5] → 0, 0
    assert_close(rloo_advantages(t(3.0, 1.0, 2.0), 3), t(1.5, -1.5, 0.0))
    assert_close(rloo_advantages(t(5.0, 5.0), 2), t(0.0, 0.0))


# ----------------------------------------------------------------------------- REINFORCE++

def test_discounted_returns():
    # γ = 0.5, rewards [1, 0, 2] → G2 = 2, G1 = 0 + 0.5·2 = 1, G0 = 1 + 0.5·1 = 1.5
    # row 2 stops at t = 1: the reward 7 on padding never reaches the returns
    r = t([1.0, 0.0, 2.0], [0.0, 4.0, 7.0])
    mask = t([1, 1, 1], [1, 1, 0])
    assert_close(discounted_returns(r, mask, 0.5), t([1.5, 1.0, 2.0], [2.0, 4.0, 0.0]))


def test_reinforce_pp_sequence_rewards_no_baseline():
    # seq rewards [1, 0] on the last token, γ = 1 → returns [[1, 1, 1], [0, 0, ·]]
    # masked mean 3/5 = 0.6; population var (3·0.16 + 2·0.36)/5 = 0.24
    mask = t([1, 1, 1], [1, 1, 0])
    adv = reinforce_pp_advantages(t(1.0, 0.0), mask, gamma=1.0, baseline=False, eps=0.0)
    hi, lo = 0.4 / math.sqrt(0.24), -0.6 / math.sqrt(0.24)               # 0.816497, -1.224745
    assert_close(adv, t([hi, hi, hi], [lo, lo, 0.0]))


def test_reinforce_pp_with_and_without_group_baseline():
    rewards = t(1.0, 0.0, 1.0, 1.0)
    mask = torch.ones(4, 2)
    # no baseline: returns per row 1, 0, 1, 1; mean 0.75, var 0.1875 (std 0.433013)
    no_base = reinforce_pp_advantages(rewards, mask, baseline=False, eps=0.0)
    assert_close(no_base[:, 0], t(0.57735, -1.732051, 0.57735, 0.57735))
    # group baseline (G = 2): returns 0.5, -0.5, 0, 0; mean 0, var 0.125 (std 0.353553)
    with_base = reinforce_pp_advantages(rewards, mask, baseline=True, group_size=2, eps=0.0)
    assert_close(with_base[:, 0], t(1.414214, -1.414214, 0.0, 0.0))
    assert_close(with_base[:, 1], with_base[:, 0])
    # batch baseline: 0.75 subtracted from every row, whitening removes it again
    batch_base = reinforce_pp_advantages(rewards, mask, baseline=True, group_size=None, eps=0.0)
    assert_close(batch_base, no_base)


def test_reinforce_pp_token_rewards_discounted():
    # token rewards [[0, 1], [0, 0]] with γ = 0.5 → returns [[0.5, 1], [0, 0]]
    # mean 0.375, var (0.015625 + 0.390625 + 2·0.140625)/4 = 0.171875
    adv = reinforce_pp_advantages(t([0.0, 1.0], [0.0, 0.0]), torch.ones(2, 2), gamma=0.5, eps=0.0)
    s = math.sqrt(0.171875)
    assert_close(adv, t([0.125 / s, 0.625 / s], [-0.375 / s, -0.375 / s]))


# ----------------------------------------------------------------------------- GAE

def test_gae_hand_computed():
    # γ = 0.9, λ = 0.8, γλ = 0.72
    # row 1: r = [0, 0, 1], V = [0.5, 0.6, 0.7], all three tokens real
    #   δ2 = 1 − 0.7 = 0.3                      A2 = 0.3
    #   δ1 = 0 + 0.9·0.7 − 0.6 = 0.03           A1 = 0.03 + 0.72·0.3   = 0.246
    #   δ0 = 0 + 0.9·0.6 − 0.5 = 0.04           A0 = 0.04 + 0.72·0.246 = 0.21712
    #   R  = A + V = [0.71712, 0.846, 1.0]
    # row 2: r = [0, 1, 0], V = [0.2, 0.4, 5.0], mask [1, 1, 0] — V = 5 at padding must not leak in
    #   δ1 = 1 + 0 − 0.4 = 0.6                  A1 = 0.6
    #   δ0 = 0 + 0.9·0.4 − 0.2 = 0.16           A0 = 0.16 + 0.72·0.6 = 0.592
    #   R  = [0.792, 1.0, 0]
    rewards = t([0.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    values = t([0.5, 0.6, 0.7], [0.2, 0.4, 5.0])
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, t([0.21712, 0.246, 0.3], [0.592, 0.6, 0.0]))
    assert_close(ret, t([0.71712, 0.846, 1.0], [0.792, 1.0, 0.0]))


def test_gae_lambda_one_is_monte_carlo_and_lambda_zero_is_td():
    rewards = t([0.0, 0.0, 1.0])
    values = t([0.5, 0.6, 0.7])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert_close(ret, t([0.81, 0.9, 1.0]))                               # γ², γ, 1
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    assert_close(adv, t([0.04, 0.03, 0.3]))                              # the one-step δs


# ----------------------------------------------------------------------------- KL, entropy

def test_kl_estimators_at_known_values():
    # π = 0.5, π_ref = 0.25: log ratio = ln 2 = 0.693147
    logp = torch.tensor([math.log(0.5), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.3)])
    assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.693147, 0.0]))
    assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.240227, 0.0]))      # ½ ln²2
    assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([0.193147, 0.0]))      # 0.5 + ln 2 − 1
    # π below π_ref: log ratio −ln 2 → k1 = −0.693147, k3 = 2 − ln 2 − 1 = 0.306853
    assert_close(kl_estimate(ref[:1], logp[:1], "k1"), torch.tensor([-0.693147]))
    assert_close(kl_estimate(ref[:1], logp[:1], "k3"), torch.tensor([0.306853]))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


def test_entropy_from_logits():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1, :2] = torch.log(torch.tensor([1.0, 3.0]))
    logits[0, 1, 2:] = -1e9                                              # p = [0.25, 0.75, 0, 0]
    # uniform over 4: ln 4 = 1.386294 ; [0.25, 0.75]: −(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    assert_close(entropy_from_logits(logits), t([1.386294, 0.562335]))


# ----------------------------------------------------------------------------- aggregation

def test_three_aggregations_differ_on_ragged_mask():
    loss = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = t([1, 1, 1], [1, 0, 0])
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert_close(aggregate(loss, mask, "token-mean"), torch.tensor(2.5))
    # seq-mean-token-mean: (mean(1, 2, 3) + mean(4)) / 2 = (2 + 4) / 2 = 3
    assert_close(aggregate(loss, mask, "seq-mean-token-mean"), torch.tensor(3.0))
    # seq-mean-token-sum-norm, L = T = 3: (6/3 + 4/3) / 2 = 5/3 ; L = 4: (6/4 + 4/4) / 2 = 1.25
    assert_close(aggregate(loss, mask, "seq-mean-token-sum-norm"), torch.tensor(5 / 3))
    assert_close(aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=4), torch.tensor(1.25))
    with pytest.raises(ValueError):
        aggregate(loss, mask, "sum")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- policy loss

def test_policy_loss_clipping_values_and_gradients():
    # clip_low = 0.2, clip_high = 0.28 (clip-higher); old logp = 0 so r = exp(logp)
    #   r = 1.5,  A = +1: clipped to 1.28       → ℓ = −1.28, ∂ℓ/∂logp = 0
    #   r = 0.5,  A = +1: min(0.5, 0.8) = 0.5   → ℓ = −0.5,  ∂ℓ/∂logp = −A·r = −0.5
    #   r = 0.5,  A = −1: min(−0.5, −0.8) = −0.8 → ℓ = 0.8,  ∂ℓ/∂logp = 0
    #   r = 1.25, A = +1: inside [0.8, 1.28]    → ℓ = −1.25, ∂ℓ/∂logp = −1.25
    #   a masked token with a huge ratio must not count
    # token-mean over 4 tokens: (−1.28 − 0.5 + 0.8 − 1.25) / 4 = −0.5575; gradients / 4
    logp = torch.log(t([1.5, 0.5, 0.5, 1.25, 20.0])).requires_grad_(True)
    old = torch.zeros(1, 5)
    adv = t([1.0, 1.0, -1.0, 1.0, 1.0])
    mask = t([1, 1, 1, 1, 0])
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token-mean")
    assert_close(loss, torch.tensor(-0.5575))
    loss.backward()
    assert_close(logp.grad, t([0.0, -0.125, 0.0, -0.3125, 0.0]))
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.25) / 4)
    # approx_kl: k3(logp, old) = 1/r − 1 + ln r per token, averaged
    k3 = [1 / r - 1 + math.log(r) for r in (1.5, 0.5, 0.5, 1.25)]
    assert metrics["approx_kl"] == pytest.approx(sum(k3) / 4, rel=1e-5)


def test_policy_loss_symmetric_clip_clips_ratio_1_25():
    # with clip_high = 0.2, r = 1.25 and A = 1 is clipped: ℓ = −1.2 and no gradient
    logp = torch.log(t([1.25])).requires_grad_(True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 1), t([2.0])[0], torch.ones(1, 1))
    assert_close(loss, torch.tensor(-2.4))                              # −1.2 · A with A = 2
    loss.backward()
    assert_close(logp.grad, t([0.0]))
    assert metrics["clip_fraction"] == 1.0


def test_policy_loss_sequence_advantages_broadcast_and_aggregation():
    # ratio 1 everywhere, so ℓ_t = −A_i; A = [2, −1] per sequence; lengths 3 and 1
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = t([1, 1, 1], [1, 0, 0])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, agg="token-mean")
    assert_close(loss, torch.tensor(-1.25))                              # (−2·3 + 1) / 4
    loss, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, agg="seq-mean-token-mean")
    assert_close(loss, torch.tensor(-0.5))                               # (−2 + 1) / 2
    loss, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, agg="seq-mean-token-sum-norm")
    assert_close(loss, torch.tensor(-5 / 6))                             # (−6/3 + 1/3) / 2


def test_policy_loss_tis_weights_scale_tokens_as_constants():
    logp = torch.zeros(1, 2, requires_grad=True)
    w = t([0.5, 2.0]).requires_grad_(True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), t([1.0, 1.0]), torch.ones(1, 2), tis_weights=w)
    assert_close(loss, torch.tensor(-1.25))                              # (−0.5 − 2) / 2
    loss.backward()
    assert_close(logp.grad, t([-0.25, -1.0]))                            # −w·r·A / 2
    assert w.grad is None


# ----------------------------------------------------------------------------- value loss

def test_value_loss_clipping():
    # clip 0.2, V_old = 0
    #   V = 0.5, R = 1: V_clip = 0.2; max(0.25, 0.64) = 0.64 → 0.32 (the clipped branch wins)
    #   V = 0.1, R = 0: V_clip = 0.1; 0.01 → 0.005
    #   V = 0.9, R = 0: V_clip = 0.2; max(0.81, 0.04) = 0.81 → 0.405 (the unclipped branch wins)
    #   masked token with a huge error ignored
    # mean (0.32 + 0.005 + 0.405) / 3 = 0.243333
    values = t([0.5, 0.1, 0.9, 100.0]).requires_grad_(True)
    old = torch.zeros(1, 4)
    returns = t([1.0, 0.0, 0.0, 0.0])
    mask = t([1, 1, 1, 0])
    loss = value_loss(values, old, returns, mask, clip=0.2)
    assert_close(loss, torch.tensor(0.73 / 3))
    loss.backward()
    # clipped branch has no gradient; the others: (V − R) / 3
    assert_close(values.grad, t([0.0, 0.1 / 3, 0.3, 0.0]))


# ----------------------------------------------------------------------------- dynamic sampling

def test_dynamic_sampling_keep():
    rewards = t(1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5)
    assert dynamic_sampling_keep(rewards, 2).tolist() == [False, True, False, False]
    assert dynamic_sampling_keep(t(1.0, 1.0, 1.0, 0.0, 1.0, 1.0), 3).tolist() == [False, True]


# ----------------------------------------------------------------------------- guards

@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce++", "reinforce++-baseline"])
def test_a_nan_reward_is_refused_not_spread_over_its_group(advantage):
    from rlserve.rl.advantages import compute_advantages
    from rlserve.rl.config import AlgorithmSection
    rewards = t(1.0, float("nan"), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"non-finite rewards at samples \[1\]"):
        compute_advantages(AlgorithmSection(advantage=advantage), rewards, torch.ones(4, 2), 2)


def test_reinforce_pp_baseline_under_a_per_token_kl_penalty_is_the_documented_one():
    """γ = 1, kl.mode=reward: token t of sample i gets score_i − b_g − Σ_{k≥t} coef·kl_{i,k} before whitening,
    b_g the group mean of (score − summed penalty); not R_i − b_g on every token."""
    from rlserve.rl.advantages import compute_advantages
    from rlserve.rl.config import AlgorithmSection
    scores = t(1.0, 0.0)
    mask = t([1, 1, 1], [1, 1, 0])
    penalty = t([0.1, 0.2, 0.3], [0.4, 0.5, 9.0])                    # 9.0 sits on padding
    b = ((1.0 - 0.6) + (0.0 - 0.9)) / 2
    pre_whitening = t([1.0 - b - 0.6, 1.0 - b - 0.5, 1.0 - b - 0.3], [0.0 - b - 0.9, 0.0 - b - 0.5, 0.0])
    adv, _ = compute_advantages(AlgorithmSection(advantage="reinforce++-baseline"), scores, mask, 2, penalty)
    assert_close(adv, masked_whiten(pre_whitening, mask, eps=1e-8))
    # every token seeing R_i − b_g (verl's broadcast) would give each row a single value
    assert adv[0, 0] != adv[0, 2]


def test_kl_estimate_clamps_are_verls_and_off_by_default():
    logp, ref = t(0.0, 0.0, 0.0), t(30.0, -30.0, 1.0)
    raw = kl_estimate(logp, ref, "k3")
    assert raw[0].item() > 1e12                                       # exp(30) unclamped
    log_only = kl_estimate(logp, ref, "k3", log_ratio_clamp=20.0)
    assert log_only[0].item() == pytest.approx(math.exp(20) - 20 - 1, rel=1e-5)
    both = kl_estimate(logp, ref, "k3", log_ratio_clamp=20.0, k3_clamp=10.0)
    assert both.tolist() == pytest.approx([10.0, 10.0, math.exp(1) - 1 - 1], rel=1e-5)
    assert_close(kl_estimate(logp, ref, "k1", 20.0, 10.0), kl_estimate(logp, ref, "k1"))   # k3 only


def test_policy_loss_log_ratio_clamp_keeps_the_ratio_finite():
    logp, old = t([200.0, 0.0]), t([0.0, 0.0])
    adv, mask = t(1.0), t([1.0, 1.0])
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert math.isinf(metrics["ratio_mean"])
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, log_ratio_clamp=20.0)
    assert metrics["ratio_mean"] == pytest.approx((math.exp(20) + 1) / 2, rel=1e-5)


def test_dual_clip_bounds_the_loss_of_negative_advantages_only():
    # ratios 5, 5, 0.5 with advantages −1, +1, −1 and c = 3
    logp = torch.log(t([5.0, 5.0, 0.5])).requires_grad_()
    old, adv, mask = torch.zeros(1, 3), t([-1.0, 1.0, -1.0]), torch.ones(1, 3)
    plain, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, agg="token-mean")
    # PPO: max(−A·r, −A·clip(r)) = 5, −1.2, 0.8
    assert plain.item() == pytest.approx((5.0 - 1.2 + 0.8) / 3)
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, agg="token-mean", dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 - 1.2 + 0.8) / 3)       # only the first token is bounded, at −c·A
    assert metrics["dual_clip_fraction"] == pytest.approx(1 / 3)
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0                              # the bound is a constant
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=1.0)
