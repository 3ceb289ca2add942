"""Server mode (rollout.backend=server): rollouts come from an rlserve server the trainer pushes its
weights to before every step. The same seed and task draw the same samples as colocated mode, the toy
task is learnt as it is colocated, and a server the trainer launched is gone when training ends."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rl_toy import share_of_a, toy_config, toy_prompts, toy_train

from rlserve.config_args import engine_flags
from rlserve.rl import remote as remote_mod
from rlserve.rl.remote import LaunchedServer, RemoteRollout
from rlserve.rl.rollout import encode_prompt, generate_rollout
from rlserve.rl.train import setup


def _gone(server: LaunchedServer) -> bool:
    """The server and everything of its process group (the engine core process) have exited."""
    if server.proc.poll() is None:
        return False
    try:
        os.killpg(server.proc.pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_engine_flags_round_trip(tiny_model_dir):
    from rlserve.config_args import parse_engine_args

    cfg = toy_config(tiny_model_dir("tiny-llama"), Path("unused")).model.engine.with_options(seed=7)
    assert parse_engine_args(engine_flags(cfg)) == cfg


@pytest.mark.parametrize("weight_sync", ["tensor", "disk"])
def test_server_rollout_equals_colocated(tiny_model_dir, tmp_path, weight_sync):
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path, "rollout.temperature=0", "rollout.backend=server",
                     f"rollout.weight_sync={weight_sync}")
    run = setup(cfg, share_of_a, toy_prompts(cfg.seed))
    remote = RemoteRollout.start(cfg.rollout, cfg.model.engine.with_options(seed=cfg.seed), tmp_path)
    launched = remote.launched
    assert launched is not None
    try:
        encoded = [encode_prompt(run.llm, s) for s in run.prompts.take(cfg.task.prompts_per_step)]
        ids, fields = [i for i, _ in encoded], [f for _, f in encoded]

        def both(version: int) -> None:
            remote.push_weights(run.llm, version)
            assert remote.weight_versions() == [str(version)]
            local = generate_rollout(run.llm, cfg.rollout, ids, fields, share_of_a, seed=5)
            served = remote.generate_rollout(cfg.rollout, ids, fields, share_of_a, seed=5)
            assert served.completion_ids == local.completion_ids
            assert served.completion_texts == local.completion_texts
            assert torch.equal(served.mask, local.mask) and torch.equal(served.rewards, local.rewards)
            torch.testing.assert_close(served.engine_logprobs, local.engine_logprobs, atol=1e-4, rtol=0)
            assert served.group_size == local.group_size and served.num_groups == len(ids)
        both(0)
        # New weights on the trainer: the server samples from them only once they are pushed.
        with torch.no_grad():
            for p in run.policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        run.llm.engine.flush_cache()
        both(1)
    finally:
        remote.close()
    assert _gone(launched)


def test_server_mode_learns_and_stops_its_server(tiny_model_dir, tmp_path, monkeypatch):
    seen: dict[str, object] = {}

    class Recording(LaunchedServer):
        def stop(self, timeout: float = 60.0) -> None:
            # the weight version the server reports just before the trainer stops it
            import httpx
            seen["version"] = httpx.get(self.url + "/get_server_info", timeout=30).json()["weight_version"]
            seen["server"] = self
            super().stop(timeout)
    monkeypatch.setattr(remote_mod, "LaunchedServer", Recording)

    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "rollout.backend=server")
    rewards = [r["reward"] for r in history]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3      # as tests/rl/test_grpo_toy.py colocated
    assert start < 0.75 and end > 0.9 and end - start > 0.2, rewards
    assert all("push_s" in r for r in history)
    assert seen["version"] == str(history[-1]["step"])
    server = seen["server"]
    assert isinstance(server, LaunchedServer) and _gone(server)


def test_server_mode_with_given_urls(tiny_model_dir, tmp_path):
    """Servers given by URL are used as they are and left running; disk sync reaches them too."""
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path)
    server = LaunchedServer(cfg.model.engine.with_options(seed=cfg.seed), tmp_path / "server.log")
    try:
        probe = RemoteRollout([server.url])
        server.wait_ready(probe.clients[0])
        history = toy_train(tiny_model_dir("tiny-llama"), tmp_path / "run", "steps=2", "rollout.backend=server",
                            f"rollout.server_urls=[{server.url}]", "rollout.weight_sync=disk")
        assert [r["step"] for r in history] == [0, 1]
        assert probe.weight_versions() == ["1"] and probe.clients[0].health()
        probe.close()
    finally:
        server.stop()
    assert _gone(server)
