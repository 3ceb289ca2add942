"""RL server mode behind sglang-router: with rollout.dp=2 the trainer launches two workers and a router,
the rollout goes through the router one prompt per request, and its samples and tempered logprobs equal
the colocated rollout's (sampled, not greedy, so the seed and the logprobs mode must both survive the
router); the weight push reaches both workers, and everything is stopped at the end. With
rollout.router_url the trainer uses a router it is given (distributed sync: each worker its rank)."""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from rlserve.rl.config import TrainConfig, load_config
from rlserve.rl.prompts import PromptStream
from rlserve.rl.remote import RemoteRollout, launch_dp
from rlserve.rl.rollout import encode_prompt, generate_rollout
from rlserve.rl.train import Run, setup


def share_of_a(prompt: str, completion: str, **_: Any) -> float:
    return completion.count("a") / 8


def _prompts(seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    while True:
        yield {"prompt": [rng.randint(10, 20000) for _ in range(8)]}


def config(model_dir: Path, out: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [f"model.path={model_dir}", f"output_dir={out}", "task.prompts_per_step=4",
                              "task.eval_every=0", "rollout.group_size=4", "rollout.max_tokens=10",
                              "rollout.temperature=0.7", 'rollout.constraint={"regex": "[ab]{8}"}',
                              "rollout.backend=server", "logging.progress_bar=false", *overrides])


def start(cfg: TrainConfig, out: Path) -> tuple[Run, RemoteRollout]:
    run = setup(cfg, share_of_a, PromptStream(generator=lambda: _prompts(cfg.seed)))
    return run, RemoteRollout.start(cfg.rollout, cfg.model.engine.with_options(seed=cfg.seed), out)


def assert_same_rollout(run: Run, remote: RemoteRollout, cfg: TrainConfig, version: int) -> None:
    encoded = [encode_prompt(run.llm, s) for s in run.prompts.take(cfg.task.prompts_per_step)]
    ids, fields = [i for i, _ in encoded], [f for _, f in encoded]
    remote.push_weights(run.llm, version)
    assert remote.weight_versions() == [str(version)] * 2
    local = generate_rollout(run.llm, cfg.rollout, ids, fields, share_of_a, seed=5)
    served = remote.generate_rollout(cfg.rollout, ids, fields, share_of_a, seed=5)
    assert served.completion_ids == local.completion_ids
    assert len({tuple(c) for c in served.completion_ids}) > cfg.task.prompts_per_step   # sampled, not greedy
    assert torch.equal(served.rewards, local.rewards) and torch.equal(served.mask, local.mask)
    torch.testing.assert_close(served.engine_logprobs, local.engine_logprobs, atol=1e-4, rtol=0)


def perturb(run: Run) -> None:
    with torch.no_grad():
        for p in run.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run.llm.engine.flush_cache()


def prompt_tokens(url: str) -> int:
    return int(httpx.get(url + "/get_server_info", timeout=30).json()["stats"]["prompt_tokens"])


def test_dp_rollout_equals_colocated_and_stops_its_servers(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir("tiny-llama"), tmp_path, "rollout.dp=2")
    run, remote = start(cfg, tmp_path)
    dp = remote.dp
    assert dp is not None and remote.router is not None
    try:
        assert sorted(remote.urls) == sorted(dp.worker_urls)
        assert_same_rollout(run, remote, cfg, 0)
        perturb(run)            # the workers sample from new weights only once they are pushed
        assert_same_rollout(run, remote, cfg, 1)
        assert all(prompt_tokens(u) > 0 for u in dp.worker_urls)     # the router used both
    finally:
        remote.close()
    assert dp.router is not None and not dp.router.process.alive()
    assert not any(w.process.alive() for w in dp.workers)


@pytest.fixture(scope="module")
def given_router(tiny_model_dir, tmp_path_factory):
    """Two workers and a router started outside the trainer."""
    cfg = config(tiny_model_dir("tiny-llama"), tmp_path_factory.mktemp("unused"))
    dp = launch_dp(2, cfg.model.engine.with_options(seed=cfg.seed), tmp_path_factory.mktemp("given"))
    yield dp
    dp.stop()


def test_given_router_with_distributed_sync(tiny_model_dir, tmp_path, given_router):
    cfg = config(tiny_model_dir("tiny-llama"), tmp_path, f"rollout.router_url={given_router.router_url}",
                 "rollout.weight_sync=distributed", "rollout.weight_sync_backend=gloo")
    run, remote = start(cfg, tmp_path)
    try:
        assert remote.distributed is not None and remote.dp is None
        perturb(run)
        assert_same_rollout(run, remote, cfg, 7)
    finally:
        remote.close()
    # the given router and its workers keep running
    assert given_router.router is not None and given_router.router.process.alive()
    assert all(w.process.alive() for w in given_router.workers)


def test_given_router_with_raw_logprob_workers_is_refused(tmp_path, given_router, monkeypatch):
    from rlserve.client import Client

    real = Client.get_server_info
    monkeypatch.setattr(Client, "get_server_info", lambda self: {**real(self), "logprobs_mode": "raw"})
    cfg = load_config(None, [f"output_dir={tmp_path}", "rollout.backend=server", "rollout.temperature=0.7",
                             f"rollout.router_url={given_router.router_url}"])
    with pytest.raises(ValueError, match="--logprobs-mode tempered"):
        RemoteRollout.start(cfg.rollout, cfg.model.engine, tmp_path)


def test_config_takes_one_way_to_the_servers():
    with pytest.raises(ValueError, match="one of"):
        load_config(None, ["rollout.router_url=http://x:1", "rollout.dp=2"])
    with pytest.raises(ValueError, match="rollout.dp"):
        load_config(None, ["rollout.dp=0"])


def test_worker_defaults_for_what_the_router_drops(given_router):
    """A worker started with --logprobs-mode tempered: tempered unless the request says raw; sampling_seed
    is the seed."""
    url = given_router.worker_urls[0]

    def gen(**sp: Any) -> tuple[list[int], list[float]]:
        body = {"input_ids": [5, 6, 7], "return_logprob": True,
                "sampling_params": {"temperature": 0.7, "max_new_tokens": 6, "ignore_eos": True, **sp}}
        out = httpx.post(url + "/generate", json=body, timeout=60).json()
        return out["output_ids"], [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    def same(got: tuple[list[int], list[float]], want: tuple[list[int], list[float]]) -> bool:
        # a repeated prompt's prefill comes from the prefix cache: logprobs equal up to float noise
        return got[0] == want[0] and max(abs(a - b) for a, b in zip(got[1], want[1])) <= 1e-4
    tokens, default = gen(seed=3)
    assert same(gen(sampling_seed=3), (tokens, default))
    assert same(gen(seed=3, logprobs_mode="tempered"), (tokens, default))
    raw_tokens, raw = gen(seed=3, logprobs_mode="raw")
    assert raw_tokens == tokens and max(abs(a - b) for a, b in zip(raw, default)) > 1e-2
    assert gen(seed=4)[0] != tokens
