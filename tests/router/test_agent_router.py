"""Agentic rollouts and over-sampling with abort through sglang-router, in front of two tiny-model
workers (real processes). The router forwards `rid`, so a request sent through it is aborted by rid on
every worker (it does not route /abort_request). Each agent turn is one /generate with `input_ids`, which
gives cache_aware no text for its prefix tree: one at a time, a sample's turns stay on one worker under
cache_aware and alternate between the workers under round_robin. Either way the samples are exactly the
colocated engine's (greedy) and the trainer's logprobs equal the workers' (sampled): each turn carries its
whole context, and every worker serves the same weights."""
from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import HEALTH_INTERVAL_S, served_tokens

from rlserve.rl.agent.backend import ServerBackend
from rlserve.rl.agent.rollout import agent_rollout, server_backend
from rlserve.rl.config import TrainConfig, load_config
from rlserve.rl.logprobs import completion_logprobs
from rlserve.rl.oversample import RemoteOverSampler
from rlserve.rl.prompts import PromptStream
from rlserve.rl.remote import RemoteRollout, launch_dp
from rlserve.rl.train import Run, setup
from rlserve.router.config import RouterConfig
from rlserve.router.launch import RouterProcess
from rlserve.sampling import SamplingParams
from tests.rl.agent_echo import ECHO, STOPS, chat_prompts, every_turn_calls_echo, rebuilt

MAX_TURNS, GROUP = 4, 3


def _zero(*_: Any, **__: Any) -> float:
    return 0.0


def share_of_a(prompt: str, completion: str, **_: Any) -> float:
    return completion.count("a") / 8


def _random_prompts() -> Iterator[dict[str, Any]]:
    rng = random.Random(0)
    while True:
        yield {"prompt": [rng.randint(10, 20000) for _ in range(8)]}


def _config(model: Path, out: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [f"model.path={model}", f"output_dir={out}", "rollout.backend=server",
                              "task.eval_every=0", "logging.progress_bar=false",
                              # one group of 8 at a time on each worker: the surplus waits or runs
                              "model.max_running_requests=8", *overrides])


@pytest.fixture(scope="module")
def setting(tiny_model_dir, tmp_path_factory) -> Iterator[tuple[Run, Any, RouterProcess]]:
    """The trainer, two workers behind a cache_aware router (`launch_dp`, as rollout.dp=2) and a
    round_robin router in front of the same workers; the trainer's weights pushed as version 0."""
    out = tmp_path_factory.mktemp("agent-router")
    cfg = _config(tiny_model_dir("tiny-llama"), out)
    run = setup(cfg, _zero, PromptStream(generator=_random_prompts))
    dp = launch_dp(2, cfg.model.engine.with_options(seed=cfg.seed), out)
    from rlserve.net import free_port

    rr = RouterProcess(RouterConfig(policy="round_robin", health_check_interval_secs=HEALTH_INTERVAL_S),
                       dp.worker_urls, "127.0.0.1", free_port(), out / "rr.log", drain_timeout=5)
    try:
        rr.start()
        rr.wait_workers(dp.worker_urls)
        remote = RemoteRollout([], router_url=dp.router_url)
        remote.push_weights(run.llm, 0)
        remote.close()
        run.llm.engine.set_weight_version("0")
        yield run, dp, rr
    finally:
        rr.stop()
        dp.stop()


def _remote(router_url: str) -> RemoteRollout:
    return RemoteRollout([], router_url=router_url)


def _loads(urls: list[str]) -> list[dict[str, Any]]:
    return [httpx.get(u + "/get_load", timeout=30).json()[0] for u in urls]


def _idle(urls: list[str]) -> bool:
    return all(load["num_reqs"] == 0 and load["num_tokens"] == 0 for load in _loads(urls))


def _agent_cfg(run: Run, temperature: float, group_size: int = GROUP) -> Any:
    cfg = copy.deepcopy(run.cfg.rollout)
    cfg.agent.enabled, cfg.agent.max_turns, cfg.agent.max_turn_tokens = True, MAX_TURNS, 20
    cfg.max_tokens, cfg.group_size, cfg.temperature = 400, group_size, temperature
    cfg.constraint = {"stop_token_ids": STOPS}
    return cfg


KW: dict[str, Any] = {"tools": [ECHO], "parser": every_turn_calls_echo}


def _workers_per_sample(run: Run, remote: RemoteRollout, prompts: list[list[int]], workers: list[str]
                        ) -> list[set[str]]:
    """One sample at a time (sampled): the workers that took in any of its turns' prompts."""
    cfg, placed = _agent_cfg(run, 0.7, group_size=1), []
    for k, p in enumerate(prompts):
        before = [served_tokens(u) for u in workers]
        agent_rollout(run.llm, cfg, [p], [{}], _zero, seed=50 + k, backend=server_backend(remote), **KW)
        placed.append({u for u, b in zip(workers, before) if served_tokens(u) > b})
    return placed


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
def test_agent_rollout_through_the_router(setting, policy):
    run, dp, rr = setting
    llm = run.llm
    remote = _remote(dp.router_url if policy == "cache_aware" else rr.url)
    try:
        prompts = chat_prompts(llm, 4)
        # greedy: the colocated engine's conversations, token for token, mask and logprobs
        served = agent_rollout(llm, _agent_cfg(run, 0.0), prompts, [{}] * 4, _zero, seed=11,
                               backend=server_backend(remote), **KW)
        local = agent_rollout(llm, _agent_cfg(run, 0.0), prompts, [{}] * 4, _zero, seed=11, **KW)
        assert served.prompt_ids == local.prompt_ids and served.completion_ids == local.completion_ids
        assert torch.equal(served.mask, local.mask) and served.metrics == local.metrics
        torch.testing.assert_close(served.engine_logprobs, local.engine_logprobs, atol=1e-4, rtol=0)
        # sampled (the seed goes as sampling_seed, the workers report tempered logprobs)
        cfg = _agent_cfg(run, 0.7)
        served = agent_rollout(llm, cfg, prompts, [{}] * 4, _zero, seed=11, backend=server_backend(remote), **KW)
        assert served.metrics["agent_truncated"] == 4 * GROUP and served.metrics["agent_turns_mean"] == MAX_TURNS
        assert len({tuple(c) for c in served.completion_ids}) == 4 * GROUP     # distinct seeds in a group
        assert served.token_versions is not None and (served.token_versions[served.mask.bool()] == 0).all()
        for ids, m in zip(served.completion_ids, served.mask):
            assert rebuilt(llm, ids, m[:len(ids)].tolist()) == ids
        with torch.no_grad():
            trainer = completion_logprobs(llm.engine.model, served.prompt_ids, served.completion_ids, 0.7)
        for i, lp in enumerate(trainer):
            m = served.mask[i, :len(lp)].bool()
            assert (lp[m] - served.engine_logprobs[i, :len(lp)][m]).abs().max().item() < 1e-4, i
            assert (served.engine_logprobs[i, :len(lp)][~m] == 0).all()
        # where each sample's turns ran: one worker (cache_aware), both (round_robin: turn by turn)
        placed = _workers_per_sample(run, remote, prompts[:3], dp.worker_urls)
        assert [len(w) for w in placed] == [1 if policy == "cache_aware" else 2] * 3, placed
        assert _idle(dp.worker_urls)
    finally:
        remote.close()


def test_a_cancelled_turn_through_the_router_is_aborted_on_its_worker(setting):
    _, dp, rr = setting

    async def cancel_mid_turn() -> None:
        backend = ServerBackend([rr.url], logprobs_mode=None, routed=True)
        assert sorted(u for u in (c.base_url for c in backend.workers)) == sorted(dp.worker_urls)
        params = SamplingParams(temperature=1.0, max_tokens=4000, ignore_eos=True, seed=1, logprobs=0)
        turn = asyncio.ensure_future(backend.generate([1, 2, 3], params))
        while all(load["num_reqs"] == 0 for load in _loads(dp.worker_urls)):     # running on a worker
            await asyncio.sleep(0.05)
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
        # stopped by the abort, not by the connection closing (the client is still open)
        assert _idle(dp.worker_urls), _loads(dp.worker_urls)
        await backend.aclose()
    asyncio.run(cancel_mid_turn())


@pytest.mark.parametrize("partial", [False, True])
def test_over_sampling_through_the_router_aborts_the_surplus_on_every_worker(setting, tmp_path, partial):
    run, dp, rr = setting
    cfg = _config(Path(run.cfg.model.path), tmp_path, "rollout.over_sample=2.0", "task.prompts_per_step=4",
                  "rollout.group_size=8", "rollout.max_tokens=32", f"rollout.partial={str(partial).lower()}",
                  f'rollout.constraint={{"stop_token_ids": {list(range(5, 49152, 12))}}}')
    remote = _remote(rr.url)      # round_robin: the groups alternate between the workers
    try:
        before = [served_tokens(u) for u in dp.worker_urls]
        sampler = RemoteOverSampler(remote, cfg.rollout, share_of_a, dynamic_sampling=False)
        rng = random.Random(3)
        started: list[list[int]] = []

        def take(n: int) -> list[tuple[list[int], dict[str, Any]]]:
            started.extend([rng.randint(10, 20000) for _ in range(8)] for _ in range(n))
            return [(p, {}) for p in started[-n:]]
        rollout, metrics = sampler.rollout(2, take, seed=100)
        assert metrics["groups_started"] == 4 and rollout.num_groups == 2
        assert metrics["groups_aborted"] >= 1
        # both workers ran groups; neither runs anything nor holds KV once the step has returned
        assert all(served_tokens(u) > b for u, b in zip(dp.worker_urls, before))
        assert _idle(dp.worker_urls), _loads(dp.worker_urls)
        kept = rollout.prompt_ids[::8]
        assert [g.prompt_ids for g in sampler.queue] == [p for p in started if p not in kept]
        if partial:     # samples cut off mid-way by the abort (run to their end, they would have finished)
            assert metrics["tokens_wasted"] == 0
            assert any(s.tokens and not s.finished for g in sampler.queue for s in g.samples)
        else:           # from scratch next step
            assert metrics["tokens_wasted"] > 0 and not any(g.started for g in sampler.queue)
        # the kept groups are what a plain rollout through the router draws for those prompts and seeds
        for ids in kept:
            plain = remote.generate_rollout(cfg.rollout, [ids], [{}], share_of_a, seed=100 + started.index(ids) * 8)
            rows = [r for r, p in enumerate(rollout.prompt_ids) if p == ids]
            assert [rollout.completion_ids[r] for r in rows] == plain.completion_ids
    finally:
        remote.close()
