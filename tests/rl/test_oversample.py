"""Over-sampling with abort on the colocated engine: a step starts more groups than it needs, keeps the
first that pass the filter, aborts the rest (their KV freed, nothing leaked) and starts those prompts
first next step."""
from __future__ import annotations

from rl_toy import share_of_a, toy_config, toy_prompts, toy_train

from rlserve.rl.oversample import OverSampler
from rlserve.rl.rollout import encode_prompt, generate_rollout
from rlserve.rl.train import setup

# One group of 8 runs at a time, so the first groups finish while the others wait or run.
ONE_GROUP_AT_A_TIME = "model.max_running_requests=8"


def _prompts(run, n):
    return [encode_prompt(run.llm, s) for s in run.prompts.take(n)]


def _clean(engine) -> None:
    status = engine.status()
    assert engine.kv_leaked() == 0 and status.kv_leaked == 0
    assert status.running == 0 and status.waiting == 0 and not engine.has_unfinished()


def test_surplus_groups_are_aborted_and_start_first_next_step(tiny_model_dir, tmp_path):
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path, "rollout.over_sample=2.0", ONE_GROUP_AT_A_TIME)
    run = setup(cfg, share_of_a, toy_prompts(cfg.seed))
    sampler = OverSampler(run.llm, cfg.rollout, share_of_a, dynamic_sampling=False)
    fresh = []

    def take(n):
        fresh.append(_prompts(run, n))
        return fresh[-1]
    rollout, metrics = sampler.rollout(2, take, seed=100)
    started = fresh[0]
    assert len(started) == 4 and metrics["groups_started"] == 4
    assert rollout.num_groups == 2 and metrics["groups_aborted"] >= 1
    _clean(run.llm.engine)
    # the kept groups are exactly what a plain rollout draws for those prompts with those seeds
    kept = rollout.prompt_ids[::8]
    for ids in kept:
        slot = [i for i, _ in started].index(ids)
        plain = generate_rollout(run.llm, cfg.rollout, [ids], [{}], share_of_a, seed=100 + slot * 8)
        rows = [r for r in range(len(rollout.prompt_ids)) if rollout.prompt_ids[r] == ids]
        assert [rollout.completion_ids[r] for r in rows] == plain.completion_ids
        assert rollout.rewards[rows].tolist() == plain.rewards.tolist()
    # the others went back to the queue, from scratch (no partial rollouts), in their order
    back = [i for i, _ in started if i not in kept]
    assert [g.prompt_ids for g in sampler.queue] == back
    assert all(not g.started for g in sampler.queue)
    assert metrics["tokens_wasted"] > 0 and metrics["groups_queued"] == len(back)
    # next step: the queued prompts start first, then fresh ones fill up to 4
    rollout2, metrics2 = sampler.rollout(2, take, seed=200)
    assert len(fresh[1]) == 4 - len(back)
    assert metrics2["groups_started"] == 4
    assert rollout2.prompt_ids[::8] == back[:2]       # one group at a time: the first started finish first
    _clean(run.llm.engine)


def test_dynamic_sampling_keeps_only_groups_that_disagree(tiny_model_dir, tmp_path):
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path, "rollout.over_sample=3.0", ONE_GROUP_AT_A_TIME)

    def reward(prompt, completion, **fields):      # half of the prompts: one reward for every sample
        return 1.0 if fields["flat"] else share_of_a(prompt, completion)
    run = setup(cfg, reward, toy_prompts(cfg.seed))
    sampler = OverSampler(run.llm, cfg.rollout, reward, dynamic_sampling=True)
    counter = iter(range(1000))

    def take(n):
        return [(ids, {"flat": next(counter) % 2 == 0}) for ids, _ in _prompts(run, n)]
    rollout, metrics = sampler.rollout(2, take, seed=7)
    assert rollout.num_groups == 2 and metrics["groups_filtered"] >= 1
    groups = rollout.rewards.reshape(-1, 8)
    assert bool((groups.max(1).values > groups.min(1).values).all())
    _clean(run.llm.engine)


def test_loop_with_over_sampling(tiny_model_dir, tmp_path):
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "steps=3", "rollout.over_sample=1.5",
                        "algorithm.dynamic_sampling=true", ONE_GROUP_AT_A_TIME)
    for r in history:
        assert r["groups_started"] == 6 and r["groups_kept"] <= 4
        assert r["groups_kept"] + r["groups_filtered"] + r["groups_aborted"] <= 6
    assert sum(r["groups_aborted"] for r in history) > 0
