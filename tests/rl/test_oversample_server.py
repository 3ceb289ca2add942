"""Over-sampling with abort in server mode: a step starts more groups than it needs on a launched server,
keeps the first that finish, aborts the rest through /abort_request (the server's KV back to free, nothing
running: /get_load), and starts those prompts first next step, from scratch or (partial rollouts) as far
as they got."""
from __future__ import annotations

from typing import Any

import httpx
import pytest
from rl_toy import share_of_a, toy_config, toy_prompts, toy_train

from rlserve.rl.oversample import RemoteOverSampler
from rlserve.rl.remote import RemoteRollout
from rlserve.rl.rollout import encode_prompt
from rlserve.rl.train import setup

# The server runs one group of 8 at a time, so the first groups finish while the others wait or run.
ONE_GROUP_AT_A_TIME = "model.max_running_requests=8"
# samples of different lengths, and resumable (a grammar's state would not be)
STOPS = f'rollout.constraint={{"stop_token_ids": {list(range(5, 49152, 12))}}}'


def _load(remote: RemoteRollout) -> dict[str, Any]:
    return httpx.get(remote.urls[0] + "/get_load", timeout=30).json()[0]


@pytest.mark.parametrize("partial", [False, True])
def test_server_surplus_is_aborted_and_leaks_nothing(tiny_model_dir, tmp_path, partial):
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path, "rollout.over_sample=2.0", ONE_GROUP_AT_A_TIME,
                     "rollout.backend=server", "rollout.max_tokens=32", STOPS,
                     f"rollout.partial={str(partial).lower()}")
    run = setup(cfg, share_of_a, toy_prompts(cfg.seed))
    remote = RemoteRollout.start(cfg.rollout, cfg.model.engine.with_options(seed=cfg.seed), tmp_path)
    try:
        remote.push_weights(run.llm, 0)
        sampler = RemoteOverSampler(remote, cfg.rollout, share_of_a, dynamic_sampling=False)
        fresh: list[list[tuple[list[int], dict[str, Any]]]] = []

        def take(n: int) -> list[tuple[list[int], dict[str, Any]]]:
            fresh.append([encode_prompt(run.llm, s) for s in run.prompts.take(n)])
            return fresh[-1]
        rollout, metrics = sampler.rollout(2, take, seed=100)
        started = fresh[0]
        assert len(started) == 4 and metrics["groups_started"] == 4
        assert rollout.num_groups == 2 and metrics["groups_aborted"] >= 1
        load = _load(remote)
        assert load["num_reqs"] == 0 and load["num_tokens"] == 0, load        # nothing running, KV free
        # the kept groups are what a plain server rollout draws for those prompts with those seeds
        kept = rollout.prompt_ids[::8]
        for ids in kept:
            slot = [i for i, _ in started].index(ids)
            plain = remote.generate_rollout(cfg.rollout, [ids], [{}], share_of_a, seed=100 + slot * 8)
            rows = [r for r in range(len(rollout.prompt_ids)) if rollout.prompt_ids[r] == ids]
            assert [rollout.completion_ids[r] for r in rows] == plain.completion_ids
        assert rollout.token_versions is not None and (rollout.token_versions[rollout.mask.bool()] == 0).all()
        back = [i for i, _ in started if i not in kept]
        assert [g.prompt_ids for g in sampler.queue] == back and metrics["groups_queued"] == len(back)
        if partial:      # aborted groups keep what they generated (at least one had started)
            assert metrics["tokens_wasted"] == 0 and any(g.started for g in sampler.queue)
        else:
            assert metrics["tokens_wasted"] > 0 and not any(g.started for g in sampler.queue)
        carried = {tuple(g.prompt_ids): [list(s.tokens) for s in g.samples] for g in sampler.queue}
        # next step, under version 1: the queued prompts start first; resumed samples keep their tokens
        remote.push_weights(run.llm, 1)
        sampler.version = 1
        rollout2, metrics2 = sampler.rollout(2, take, seed=200)
        assert metrics2["groups_started"] == 4 and len(fresh[1]) == 4 - len(back)
        # (which groups finish first depends on the order the server admits concurrent requests in)
        assert {tuple(i) for i in rollout2.prompt_ids[::8]} <= {tuple(i) for i in back} | {tuple(i) for i, _ in fresh[1]}
        assert rollout2.token_versions is not None
        for r, ids in enumerate(rollout2.prompt_ids):
            before = carried.get(tuple(ids), [[]] * 8)[r % 8]
            tokens = rollout2.completion_ids[r]
            assert tokens[:len(before)] == before and len(tokens) <= 32
            versions = rollout2.token_versions[r, :len(tokens)].tolist()
            assert versions == [0] * len(before) + [1] * (len(tokens) - len(before))
        for g in sampler.queue if partial else ():     # carried, not kept yet: still start with what they had
            for s, before in zip(g.samples, carried.get(tuple(g.prompt_ids), [[]] * 8)):
                assert s.tokens[:len(before)] == before
        load = _load(remote)
        assert load["num_reqs"] == 0 and load["num_tokens"] == 0, load
    finally:
        remote.close()


def test_loop_with_over_sampling_in_server_mode(tiny_model_dir, tmp_path):
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "steps=3", "rollout.over_sample=1.5",
                        "rollout.backend=server", ONE_GROUP_AT_A_TIME)
    assert all(r["groups_started"] == 6 and r["groups_kept"] == 4 and "push_s" in r for r in history), history
    assert sum(r["groups_aborted"] for r in history) >= 1
