"""Agentic rollouts in server mode (tiny random model, fp32, a launched rlserve server): each turn is one
/generate request with input_ids, and the samples have exactly the colocated engine's ids, loss mask and
logprobs; the trainer's recompute equals the server's logprobs on every generated token; a cancelled
sample aborts its request on the server."""
from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import torch

from rlserve.rl.agent.backend import ServerBackend
from rlserve.rl.agent.rollout import agent_rollout, server_backend
from rlserve.rl.config import load_config
from rlserve.rl.logprobs import completion_logprobs
from rlserve.rl.remote import RemoteRollout
from rlserve.rl.train import setup
from rlserve.sampling import SamplingParams
from tests.rl.agent_echo import ECHO, STOPS, chat_prompts, every_turn_calls_echo, rebuilt


def _load(url: str) -> dict[str, Any]:
    return httpx.get(url + "/get_load", timeout=30).json()[0]


def _zero(*_: Any, **__: Any) -> float:
    return 0.0


def test_server_agent_samples_equal_colocated_and_trainer_logprobs(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"model.path={tiny_model_dir('tiny-qwen3')}", f"output_dir={tmp_path}",
                             "rollout.backend=server", "rollout.agent.enabled=true", "rollout.agent.max_turns=4",
                             "rollout.agent.max_turn_tokens=20", "rollout.max_tokens=400", "rollout.group_size=3"])
    cfg.rollout.constraint = {"stop_token_ids": STOPS}
    run = setup(cfg, _zero)
    llm = run.llm
    remote = RemoteRollout.start(cfg.rollout, cfg.model.engine.with_options(seed=cfg.seed), tmp_path)
    try:
        remote.push_weights(llm, 0)
        llm.engine.set_weight_version("0")
        prompts = chat_prompts(llm, 4)
        kw: dict[str, Any] = {"seed": 11, "tools": [ECHO], "parser": every_turn_calls_echo}
        # greedy: the same conversations as the colocated engine, token for token, mask and logprobs
        cfg.rollout.temperature = 0.0
        served = agent_rollout(llm, cfg.rollout, prompts, [{}] * 4, _zero, backend=server_backend(remote), **kw)
        local = agent_rollout(llm, cfg.rollout, prompts, [{}] * 4, _zero, **kw)
        assert served.prompt_ids == local.prompt_ids and served.completion_ids == local.completion_ids
        assert torch.equal(served.mask, local.mask) and served.metrics == local.metrics
        torch.testing.assert_close(served.engine_logprobs, local.engine_logprobs, atol=1e-4, rtol=0)
        for temperature in (1.0, 0.7):
            cfg.rollout.temperature = temperature
            served = agent_rollout(llm, cfg.rollout, prompts, [{}] * 4, _zero, backend=server_backend(remote), **kw)
            assert served.prompt_ids == [p for p in prompts for _ in range(3)]
            assert served.metrics["agent_truncated"] == 12 and served.metrics["agent_turns_mean"] == 4
            assert len({tuple(c) for c in served.completion_ids}) > 1      # distinct seeds in a group
            for ids, m in zip(served.completion_ids, served.mask):
                assert rebuilt(llm, ids, m[:len(ids)].tolist()) == ids
            assert served.token_versions is not None
            assert (served.token_versions[served.mask.bool()] == 0).all()
            with torch.no_grad():
                trainer = completion_logprobs(llm.engine.model, served.prompt_ids, served.completion_ids, temperature)
            for i, lp in enumerate(trainer):
                m = served.mask[i, :len(lp)].bool()
                diff = (lp[m] - served.engine_logprobs[i, :len(lp)][m]).abs().max().item()
                assert diff < 1e-4, (temperature, i, diff)
                assert (served.engine_logprobs[i, :len(lp)][~m] == 0).all()
        load = _load(remote.urls[0])
        assert load["num_reqs"] == 0 and load["num_tokens"] == 0, load
    finally:
        remote.close()


def test_a_cancelled_server_turn_is_aborted_on_the_server(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"model.path={tiny_model_dir('tiny-qwen3')}", f"output_dir={tmp_path}",
                             "rollout.backend=server"])
    remote = RemoteRollout.start(cfg.rollout, cfg.model.engine.with_options(seed=cfg.seed), tmp_path)
    url = remote.urls[0]
    try:
        async def cancel_mid_turn() -> dict[str, Any]:
            backend = ServerBackend([url])
            params = SamplingParams(temperature=1.0, max_tokens=4000, ignore_eos=True, seed=1, logprobs=0)
            turn = asyncio.ensure_future(backend.generate([1, 2, 3], params))
            while _load(url)["num_reqs"] == 0:          # running on the server
                await asyncio.sleep(0.05)
            turn.cancel()
            try:
                await turn
            except asyncio.CancelledError:
                pass
            await backend.aclose()
            return _load(url)
        load = asyncio.run(cancel_mid_turn())
        assert load["num_reqs"] == 0 and load["num_tokens"] == 0, load
    finally:
        remote.close()


def test_native_sampling_params_carry_what_the_engine_gets():
    from rlserve.rl.agent.backend import native_sampling_params
    params = SamplingParams(temperature=0.7, max_tokens=40, seed=5, stop=["\n```\n"], include_stop_str_in_output=True,
                            stop_token_ids=[3, 6], regex="[ab]+", logprobs=0)
    assert native_sampling_params(params, "tempered") == {
        "n": 1, "temperature": 0.7, "max_new_tokens": 40, "seed": 5, "stop": ["\n```\n"],
        "include_stop_str_in_output": True, "stop_token_ids": [3, 6], "regex": "[ab]+", "logprobs_mode": "tempered"}
    # through sglang-router: the seed as sampling_seed, logprobs_mode left to the workers
    routed = native_sampling_params(params, None, routed=True)
    assert routed["sampling_seed"] == 5 and "seed" not in routed and "logprobs_mode" not in routed
    with pytest.raises(ValueError, match="min_tokens"):
        native_sampling_params(SamplingParams(min_tokens=3), "tempered")
