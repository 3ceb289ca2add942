"""The loop's algorithm choices on the toy task (tiny random model, CPU, fixed seeds): PPO with a
critic learns, a KL loss holds the policy near the reference, dynamic sampling drops groups without
signal, minibatches and epochs take several optimizer steps, and the engine/trainer mismatch monitor
reads ≈ 0 when both compute the same distribution."""
from __future__ import annotations

import itertools
from typing import Any

import pytest
from rl_toy import share_of_a, toy_config, toy_train

from rlserve.rl.prompts import PromptStream
from rlserve.rl.train import train


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_ppo_with_a_critic_raises_reward(tiny_model_dir, tmp_path):
    # two micro-batches per update: policy and critic gradients are accumulated
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "algorithm.advantage=gae", "critic.lr=1e-2",
                        "algorithm.micro_batch_size=16")
    rewards = [r["reward"] for r in history]
    assert _mean(rewards[:2]) < 0.75 and _mean(rewards[-3:]) > 0.9, rewards
    value_losses = [r["value_loss"] for r in history]
    assert _mean(value_losses[-3:]) < _mean(value_losses[:3]), value_losses   # the critic learns too


def test_kl_loss_keeps_the_policy_near_the_reference(tiny_model_dir, tmp_path):
    model = tiny_model_dir("tiny-llama")
    run = ("steps=8", "optim.lr=3e-3", "kl.mode=loss", "kl.estimator=k3")
    # a negligible coefficient builds the reference and measures the drift without resisting it
    free = toy_train(model, tmp_path / "free", *run, "kl.coef=1e-6")
    held = toy_train(model, tmp_path / "held", *run, "kl.coef=10")
    free_kl, held_kl = _mean([r["kl_ref"] for r in free[-3:]]), _mean([r["kl_ref"] for r in held[-3:]])
    assert free_kl > 0.5 and held_kl < 0.4 * free_kl, (free_kl, held_kl)
    assert all("kl_loss" in r for r in held)


def _half_fixed_prompts() -> PromptStream:
    """Every other prompt carries a fixed reward, so its whole group scores the same."""
    def samples():
        for i in itertools.count():
            sample: dict[str, Any] = {"prompt": [100 + i, 200 + i, 300 + i, 400 + i]}
            if i % 2 == 0:
                sample["fixed"] = 0.5
            yield sample
    return PromptStream(generator=samples)


def _fixed_or_share_of_a(prompt: str, completion: str, fixed: float | None = None, **_: Any) -> float:
    return fixed if fixed is not None else share_of_a(prompt, completion)


def test_dynamic_sampling_drops_groups_whose_rewards_agree(tiny_model_dir, tmp_path):
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path, "steps=2", "algorithm.dynamic_sampling=true")
    history = train(cfg, reward_fn=_fixed_or_share_of_a, prompts=_half_fixed_prompts())
    assert [r["groups_kept"] for r in history] == [2, 2]
    assert all("loss" in r for r in history)
    # only fixed-reward groups: nothing to learn from, the update is skipped and the loop goes on
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path / "none", "steps=2", "algorithm.dynamic_sampling=true")
    history = train(cfg, reward_fn=lambda p, c, **_: 1.0, prompts=_half_fixed_prompts())
    assert [r["groups_kept"] for r in history] == [0, 0]
    assert not any("loss" in r for r in history)


def test_minibatches_and_epochs(tiny_model_dir, tmp_path):
    # 4 prompts × 8 = 32 samples, minibatches of 8, two epochs: 8 optimizer steps per train step
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "steps=6", "algorithm.minibatch_size=8",
                        "algorithm.ppo_epochs=2")
    assert all(r["optimizer_steps"] == 8 for r in history)
    # after the first minibatch the policy has moved away from the old one: the ratio is no longer 1
    assert history[0]["approx_kl_old"] > 0 and history[0]["clip_fraction"] > 0
    rewards = [r["reward"] for r in history]
    assert _mean(rewards[-2:]) > _mean(rewards[:2]) + 0.2, rewards


def test_mismatch_monitor_reads_zero_without_a_grammar(tiny_model_dir, tmp_path):
    # unconstrained sampling: engine and trainer compute the same distribution with the same module,
    # before and after an update (the engine serves the updated parameters)
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "steps=2", "rollout.constraint=null",
                        "rollout.ignore_eos=true", "rollout.max_tokens=6", "algorithm.tis_cap=2.0")
    for r in history:
        assert r["mismatch_abs"] < 1e-4 and abs(r["mismatch_kl"]) < 1e-6, r
        assert abs(r["tis_weight_mean"] - 1.0) < 1e-4


@pytest.mark.parametrize("overrides", [
    ("algorithm.advantage=rloo", "algorithm.loss_agg=seq-mean-token-mean", "kl.coef=0.1", "kl.mode=reward",
     "kl.estimator=k2"),
    ("algorithm.advantage=reinforce++-baseline", "algorithm.loss_agg=seq-mean-token-sum-norm",
     "algorithm.entropy_coef=0.01", "kl.coef=0.1", "kl.estimator=k1"),
    ("algorithm.advantage=reinforce++", "algorithm.normalize_std=false", "optim.warmup_steps=2"),
])
def test_other_estimators_run_in_the_loop(tiny_model_dir, tmp_path, overrides):
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "steps=2", "task.prompts_per_step=2",
                        "rollout.group_size=4", *overrides)
    for r in history:
        assert r["loss"] == r["loss"] and r["grad_norm"] > 0        # finite, and a real gradient
        for key in ("rollout_s", "logprob_s", "update_s", "sync_s", "total_s", "entropy", "response_length"):
            assert key in r
        assert ("kl_ref" in r) == any(o.startswith("kl.coef") for o in overrides)
    if "optim.warmup_steps=2" in overrides:
        assert [r["lr"] for r in history] == pytest.approx([5e-3, 1e-2])
