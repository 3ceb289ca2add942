"""Partial rollouts: an aborted group's unfinished samples keep what they generated and resume next step
for exactly their remaining token budget, under the new weight version; the update masks, reweights or
keeps the tokens drawn by older weights."""
from __future__ import annotations

import pytest
import torch
from rl_toy import share_of_a, toy_config, toy_prompts, toy_train

from rlserve.rl.batch import Rollout
from rlserve.rl.oversample import OverSampler
from rlserve.rl.partial import old_token_treatment, spans_to_versions
from rlserve.rl.rollout import encode_prompt
from rlserve.rl.train import setup

PARTIAL = ("rollout.partial=true", "rollout.ignore_eos=true", "rollout.over_sample=2.0",
           "model.max_running_requests=8",
           # a twelfth of the vocabulary ends a sample: lengths vary, so groups finish at different steps
           f'rollout.constraint={{"stop_token_ids": {list(range(5, 49152, 12))}}}')


def test_spans_to_versions():
    assert spans_to_versions([(0, "3"), (2, "4"), (5, "6")], 7, 0) == [3, 3, 4, 4, 4, 6, 6]
    assert spans_to_versions([[0, "2"]], 3, 0) == [2, 2, 2]
    assert spans_to_versions([], 2, 9) == [9, 9]


def test_unfinished_samples_resume_with_their_remaining_budget_under_the_new_version(tiny_model_dir, tmp_path):
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path, *PARTIAL)
    run = setup(cfg, share_of_a, toy_prompts(cfg.seed))
    engine = run.llm.engine
    engine.set_weight_version("0")
    sampler = OverSampler(run.llm, cfg.rollout, share_of_a, dynamic_sampling=False)

    def take(n):
        return [encode_prompt(run.llm, s) for s in run.prompts.take(n)]
    first, metrics = sampler.rollout(2, take, seed=1)
    assert metrics["tokens_wasted"] == 0 and metrics["groups_aborted"] >= 1
    assert first.token_versions is not None and bool((first.token_versions[first.mask.bool()] == 0).all())
    progress = {tuple(g.prompt_ids): [list(s.tokens) for s in g.samples] for g in sampler.queue}
    cut = [len(t) for ts in progress.values() for t in ts]
    assert any(0 < n < cfg.rollout.max_tokens for n in cut), cut      # aborted part-way
    # an update: new weights, named version 1
    with torch.no_grad():
        for p in run.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.flush_cache()
    engine.set_weight_version("1")
    queued = len(sampler.queue)
    second, _ = sampler.rollout(queued, take, seed=2)
    assert engine.kv_leaked() == 0 and not engine.has_unfinished()
    resumed = reached = 0
    for r, ids in enumerate(second.prompt_ids):
        before = progress.get(tuple(ids))
        if before is None:
            continue
        done = before[r % cfg.rollout.group_size]
        tokens, versions = second.completion_ids[r], second.token_versions[r, :len(second.completion_ids[r])]
        # a sample ends on a stop token or at exactly max_tokens: the resumed part had the remaining budget
        assert tokens[:len(done)] == done and len(tokens) <= cfg.rollout.max_tokens
        assert len(tokens) == cfg.rollout.max_tokens or tokens[-1] % 12 == 5
        assert versions.tolist() == [0] * len(done) + [1] * (len(tokens) - len(done))
        resumed += 0 < len(done) < len(tokens)
        reached += 0 < len(done) < len(tokens) == cfg.rollout.max_tokens
    assert resumed > 0 and reached > 0
    # seeds stay distinct inside a group: no two resumed continuations of one group are all equal
    for g in range(second.num_groups):
        rows = second.completion_ids[g * 8:(g + 1) * 8]
        assert len({tuple(t) for t in rows}) > 1


def _rollout() -> Rollout:
    mask = torch.tensor([[1., 1., 1., 0.], [1., 1., 1., 1.]])
    versions = torch.tensor([[4, 5, 5, 0], [5, 5, 5, 5]])
    return Rollout([[1], [1]], [[2, 3, 4], [2, 3, 4, 5]], ["", ""], torch.full((2, 4), -1.0) * mask, mask,
                   torch.tensor([0.0, 1.0]), 2, versions)


@pytest.mark.parametrize("how", ["mask", "tis", "keep"])
def test_old_token_treatment(how):
    rollout = _rollout()
    trainer = torch.full((2, 4), -0.5) * rollout.mask       # exp(−0.5 − (−1)) = 1.65
    mask, weights, metrics = old_token_treatment(rollout, trainer, 6, how, cap=1.5)
    assert metrics["tokens_old_version"] == 1 and metrics["token_staleness_max"] == 2
    if how == "mask":
        assert mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]] and weights is None
    elif how == "tis":
        assert torch.equal(mask, rollout.mask) and weights is not None
        assert weights.tolist() == [[1.5, 1, 1, 0], [1, 1, 1, 1]]
    else:
        assert torch.equal(mask, rollout.mask) and weights is None


def test_loop_with_partial_rollouts(tiny_model_dir, tmp_path):
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "steps=3", "rollout.partial_old_tokens=tis",
                        *PARTIAL)
    assert all(r["tokens_wasted"] == 0 for r in history)
    assert any(r.get("tokens_old_version", 0) > 0 for r in history[1:])
    assert all(r["groups_kept"] == 4 for r in history)
