"""The loop's pieces at unit level: TIS weights reach the policy loss, the advantage dispatcher folds
the KL penalty in as documented, prompt streams resume from one integer, checkpoints are atomic."""
from __future__ import annotations

import random

import pytest
import torch

from rlserve.config import ModelConfig
from rlserve.models.llama import LlamaForCausalLM
from rlserve.models.presets import preset_hf_config
from rlserve.rl.advantages import compute_advantages
from rlserve.rl.algorithms import group_advantages, reinforce_pp_advantages, rloo_advantages
from rlserve.rl.batch import Rollout, TrainBatch, pad
from rlserve.rl.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from rlserve.rl.config import AlgorithmSection, load_config
from rlserve.rl.logprobs import completion_logprobs, completion_logprobs_entropy
from rlserve.rl.prompts import PromptStream
from rlserve.rl.update import ppo_update, truncated_is_weights

# ----------------------------------------------------------------------------- TIS

def test_truncated_is_weights():
    old = torch.tensor([[0.0, -1.0, -2.0]])
    engine = torch.tensor([[-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = truncated_is_weights(old, engine, mask, cap=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 1.0, 0.0])   # e¹ capped at 2; equal → 1; padding → 0


def _tiny_policy() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(ModelConfig.from_hf(preset_hf_config("tiny-llama")))


def _batch(policy: LlamaForCausalLM, tis: float) -> TrainBatch:
    rng = random.Random(0)
    prompts = [[rng.randint(10, 1000) for _ in range(5)] for _ in range(4)]
    completions = [[rng.randint(10, 1000) for _ in range(n)] for n in (3, 4, 2, 4)]
    with torch.no_grad():
        old = pad(completion_logprobs(policy, prompts, completions))
    mask = pad([torch.ones(len(c)) for c in completions])
    return TrainBatch(prompts, completions, mask, old, torch.tensor([1.0, -1.0, 0.5, -0.5]),
                      tis_weights=torch.full_like(mask, tis) * mask)


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_batched_logprobs_and_entropy_equal_each_sample_computed_alone(monkeypatch, chunk_rows):
    """The micro-batch's lm_head and log-softmax run over every sample's positions together (in chunks of
    rows when the logits would be large: 4 rows here, across sample boundaries): each sample's logprobs
    and entropies equal those of that sample run alone (against the full distribution computed here by
    hand), and gradients reach the policy through both."""
    from rlserve.rl import logprobs as logprobs_module

    policy = _tiny_policy()
    if chunk_rows is not None:
        monkeypatch.setattr(logprobs_module, "LOGITS_CHUNK_ELEMENTS", chunk_rows * policy.config.vocab_size)
    rng = random.Random(1)
    prompts = [[rng.randint(10, 1000) for _ in range(n)] for n in (5, 1, 7)]
    completions = [[rng.randint(10, 1000) for _ in range(n)] for n in (3, 6, 1)]
    logps, entropies = completion_logprobs_entropy(policy, prompts, completions, temperature=0.7)
    assert [len(x) for x in logps] == [len(x) for x in entropies] == [3, 6, 1]
    for p, c, lp, ent in zip(prompts, completions, logps, entropies):
        ids = torch.tensor(p + c)
        hidden = policy(ids, torch.arange(len(ids)), cu_seqlens=[0, len(ids)])
        full = torch.log_softmax(policy.compute_logits(hidden[len(p) - 1:-1]) / 0.7, -1)
        torch.testing.assert_close(lp, full[torch.arange(len(c)), torch.tensor(c)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, -(full.exp() * full).sum(-1), rtol=1e-5, atol=1e-5)
    (torch.cat(logps).sum() + torch.cat(entropies).sum()).backward()
    assert policy.lm_head.weight.grad is not None and policy.lm_head.weight.grad.abs().sum() > 0
    assert completion_logprobs_entropy(policy, [], []) == ([], [])


@pytest.mark.parametrize("tis", [0.0, 0.5, 1.0])
def test_tis_weights_scale_the_policy_loss(tis):
    """The loss (and so the gradient) scales with the TIS weights; all-zero weights leave the policy as is."""
    cfg = load_config(None, ["optim.max_grad_norm=0"])
    policy = _tiny_policy()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    metrics = ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.1), _batch(policy, tis), cfg,
                         torch.Generator().manual_seed(0))
    reference = ppo_update(_tiny_policy(), torch.optim.SGD(policy.parameters(), lr=0.0),
                           _batch(_tiny_policy(), 1.0), cfg, torch.Generator().manual_seed(0))
    assert metrics["pg_loss"] == pytest.approx(tis * reference["pg_loss"], rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(tis * reference["grad_norm"], rel=1e-4)
    moved = any(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert moved == (tis > 0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_the_same_gradient(agg):
    """Gradient accumulation over micro-batches of one sample equals one pass over the minibatch, with
    the KL and entropy terms on, for every loss aggregation."""
    results = []
    for micro in (0, 1):
        cfg = load_config(None, ["optim.max_grad_norm=0", f"algorithm.loss_agg={agg}", "kl.coef=0.5",
                                 "algorithm.entropy_coef=0.1", f"algorithm.micro_batch_size={micro}"])
        policy = _tiny_policy()
        batch = _batch(policy, 1.0)
        batch.ref_logprobs = batch.old_logprobs - 0.3 * batch.mask
        metrics = ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.1), batch, cfg,
                             torch.Generator().manual_seed(0))
        results.append((metrics, dict(policy.named_parameters())))
    (whole, p_whole), (micro, p_micro) = results
    for key in ("loss", "pg_loss", "kl_loss", "grad_norm"):
        assert micro[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    assert all(torch.allclose(p_whole[n], p_micro[n], atol=1e-6) for n in p_whole)


# ----------------------------------------------------------------------------- advantages

def test_grpo_and_rloo_subtract_the_summed_kl_from_the_sequence_reward():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    penalty = torch.tensor([[0.1, 0.2], [0.3, 9.0], [0.0, 0.0], [0.5, 0.0]])   # 9.0 sits on padding
    shaped = torch.tensor([0.7, -0.3, 1.0, 0.5])
    adv, returns = compute_advantages(AlgorithmSection(advantage="grpo"), rewards, mask, 2, penalty)
    assert returns is None and torch.allclose(adv, group_advantages(shaped, 2))
    adv, _ = compute_advantages(AlgorithmSection(advantage="rloo"), rewards, mask, 2, penalty)
    assert torch.allclose(adv, rloo_advantages(shaped, 2))
    adv, _ = compute_advantages(AlgorithmSection(advantage="grpo", normalize_std=False), rewards, mask, 2)
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_token_level_estimators_put_the_kl_on_every_token():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    penalty = torch.full((2, 3), 0.1)
    token_rewards = torch.tensor([[-0.1, -0.1, 0.9], [-0.1, -0.1, 0.0]])
    adv, _ = compute_advantages(AlgorithmSection(advantage="reinforce++"), rewards, mask, 2, penalty)
    assert torch.allclose(adv, reinforce_pp_advantages(token_rewards, mask))
    # GAE with V ≡ 0 and γ = λ = 1: the advantages are the returns-to-go, whitened; the returns are raw
    adv, returns = compute_advantages(AlgorithmSection(advantage="gae"), rewards, mask, 2, penalty,
                                      values=torch.zeros(2, 3))
    assert torch.allclose(returns, torch.tensor([[0.7, 0.8, 0.9], [-0.2, -0.1, 0.0]]))
    assert (adv * mask).sum().item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="critic"):
        compute_advantages(AlgorithmSection(advantage="gae"), rewards, mask, 2)


def test_bad_algorithm_names_are_rejected():
    for override in ("algorithm.advantage=ppo", "algorithm.loss_agg=sum", "kl.mode=both", "kl.estimator=k4"):
        with pytest.raises(ValueError, match="must be one of"):
            load_config(None, [override])


# ----------------------------------------------------------------------------- batches

def test_rollout_keeps_whole_groups_and_batches_select_rows():
    mask = pad([torch.ones(n) for n in (1, 2, 3, 4, 5, 6)])
    rollout = Rollout([[i] for i in range(6)], [[i] * (i + 1) for i in range(6)], list("abcdef"),
                      torch.zeros_like(mask), mask, torch.arange(6.0), group_size=2)
    kept = rollout.keep_groups(torch.tensor([True, False, True]))
    assert kept.num_groups == 2 and kept.prompt_ids == [[0], [1], [4], [5]]
    assert kept.rewards.tolist() == [0, 1, 4, 5] and kept.mask.sum(-1).tolist() == [1, 2, 5, 6]
    batch = TrainBatch(kept.prompt_ids, kept.completion_ids, kept.mask, kept.mask * 2, kept.rewards)
    sub = batch.select([3, 0])
    assert sub.prompt_ids == [[5], [0]] and sub.advantages.tolist() == [5, 0] and sub.ref_logprobs is None


# ----------------------------------------------------------------------------- prompt streams

def _counting():
    i = 0
    while True:
        yield {"prompt": f"p{i}"}
        i += 1


def test_generator_stream_seeks_by_recreating_and_skipping():
    stream = PromptStream(generator=_counting)
    first = stream.take(3) + stream.take(2)
    resumed = PromptStream(generator=_counting)
    resumed.seek(3)
    assert resumed.take(2) == first[3:] and resumed.consumed == 5


def test_dataset_stream_walks_a_fresh_shuffle_each_epoch():
    items = [{"prompt": str(i)} for i in range(5)]
    stream = PromptStream(items=items, seed=7)
    epoch1, epoch2 = stream.take(5), stream.take(5)
    assert sorted(s["prompt"] for s in epoch1) == sorted(s["prompt"] for s in epoch2) == list("01234")
    assert epoch1 != epoch2                       # reshuffled (fixed seed: always true for this one)
    resumed = PromptStream(items=items, seed=7)
    resumed.seek(7)
    assert resumed.take(3) == epoch2[2:]
    assert PromptStream(items=items, seed=8).take(5) != epoch1


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in range(4):
        save_checkpoint(tmp_path, step, {"next_step": step + 1}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    # a write killed halfway leaves only a temporary directory: the newest complete one still wins
    half = tmp_path / "checkpoints" / ".tmp_step_000004_123"
    half.mkdir()
    (half / "state.pt").write_bytes(b"trunc")
    assert latest_checkpoint(tmp_path).name == "step_000003"
    assert load_checkpoint(latest_checkpoint(tmp_path))["next_step"] == 4
    save_checkpoint(tmp_path, 4, {"next_step": 5}, keep=2)
    assert not half.exists() and latest_checkpoint(tmp_path).name == "step_000004"


def test_logprob_pass_chunks_give_the_same_logprobs():
    """algorithm.logprob_micro_batch_size only sets how many samples share a forward of the logprob pass:
    old and reference logprobs are the same at any chunk size; 0 falls back to micro_batch_size."""
    from types import SimpleNamespace

    from rlserve.rl.train import recompute

    policy = _tiny_policy()
    rng = random.Random(1)
    prompts = [[rng.randint(10, 1000) for _ in range(rng.randint(2, 7))] for _ in range(6)]
    completions = [[rng.randint(10, 1000) for _ in range(rng.randint(1, 5))] for _ in range(6)]
    rollout = SimpleNamespace(prompt_ids=prompts, completion_ids=completions, mask=torch.ones(6, 5))
    outs = []
    for chunk in (1, 4, 0):
        cfg = load_config(None, ["algorithm.micro_batch_size=2", f"algorithm.logprob_micro_batch_size={chunk}"])
        assert cfg.algorithm.logprob_chunk == (chunk or 2)
        run = SimpleNamespace(cfg=cfg, policy=policy, reference=policy, critic=None)
        outs.append(recompute(run, rollout))   # type: ignore[arg-type]
    for old, ref, values in outs[1:]:
        assert torch.allclose(old, outs[0][0], atol=1e-5) and torch.allclose(ref, outs[0][1], atol=1e-5)
        assert values is None
    assert load_config(None, []).algorithm.logprob_chunk == 0
    with pytest.raises(ValueError, match="logprob_micro_batch_size"):
        load_config(None, ["algorithm.logprob_micro_batch_size=-1"])
