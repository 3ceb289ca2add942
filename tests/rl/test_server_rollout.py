"""Server mode (rollout.backend=server): rollouts come from an rlserve server the trainer pushes its
weights to before every step (tensor, disk or a gloo weight-update group). The same seed and task draw
the same samples as colocated mode, the toy task is learnt as it is colocated (with the server's memory
released between rollouts), and a server the trainer launched is gone when training ends."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from rl_toy import share_of_a, toy_config, toy_prompts, toy_train

from rlserve.client import ServerError
from rlserve.config_args import engine_flags
from rlserve.llm import LLM
from rlserve.rl import remote as remote_mod
from rlserve.rl.remote import LaunchedServer, RemoteRollout
from rlserve.rl.rollout import encode_prompt, generate_rollout
from rlserve.rl.train import setup, train
from rlserve.rl.weight_push import DistributedPush

ALL_RELEASED = ["kv_cache", "weights"]      # what /get_server_info lists once every tag is released


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


@pytest.mark.parametrize("weight_sync", ["tensor", "disk", "distributed"])
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
        if weight_sync == "tensor":
            # The launched server dies: the next call says so, with the end of its log, not a bare
            # transport error.
            os.killpg(launched.proc.pid, signal.SIGKILL)
            launched.proc.wait(30)
            with pytest.raises(RuntimeError, match=r"the rollout server exited \(code -9\)") as info:
                remote.push_weights(run.llm, 2)
            assert str(launched.log_path) in str(info.value)
    finally:
        remote.close()
    assert _gone(launched)


def test_server_mode_learns_with_offload_and_stops_its_server(tiny_model_dir, tmp_path, monkeypatch):
    """Distributed weight sync with server_offload: the server holds its memory exactly from the push to
    the end of the rollout, the trainer's own engine holds its KV pool only while it evaluates."""
    seen: dict[str, object] = {}
    during_rollout: list[list[list[str]]] = []
    after_release: list[list[list[str]]] = []

    class Recording(LaunchedServer):
        def stop(self, timeout: float = 60.0) -> None:
            # what the server reports just before the trainer stops it
            import httpx
            info = httpx.get(self.url + "/get_server_info", timeout=30).json()
            seen["version"], seen["released"], seen["server"] = info["weight_version"], info["released"], self
            super().stop(timeout)
    monkeypatch.setattr(remote_mod, "LaunchedServer", Recording)
    generate, release = RemoteRollout._generate, RemoteRollout.release_memory

    def generate_spy(self, prompts, params):
        during_rollout.append(self.released())
        return generate(self, prompts, params)

    def release_spy(self):
        release(self)
        after_release.append(self.released())
    monkeypatch.setattr(RemoteRollout, "_generate", generate_spy)
    monkeypatch.setattr(RemoteRollout, "release_memory", release_spy)
    trainer_memory: list[tuple[str, tuple[str, ...]]] = []

    def recording(name):
        original = getattr(LLM, name)

        def spy(self, tags):
            original(self, tags)
            trainer_memory.append((name, tuple(tags)))
        return spy
    for name in ("release_memory", "resume_memory"):
        monkeypatch.setattr(LLM, name, recording(name))

    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path, "rollout.backend=server",
                     "rollout.weight_sync=distributed", "rollout.server_offload=true", "task.eval_every=5")
    history = train(cfg, reward_fn=share_of_a, prompts=toy_prompts(cfg.seed), held_out=[{"prompt": [11, 12, 13]}])
    steps = [r for r in history if r["step"] >= 0]
    rewards = [r["reward"] for r in steps]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3      # as tests/rl/test_grpo_toy.py colocated
    assert start < 0.75 and end > 0.9 and end - start > 0.2, rewards
    assert all("push_s" in r and "offload_s" in r for r in steps)
    assert during_rollout == [[[]]] * len(steps)
    assert after_release == [[ALL_RELEASED]] * len(steps)
    assert seen["version"] == str(steps[-1]["step"]) and seen["released"] == ALL_RELEASED
    server = seen["server"]
    assert isinstance(server, LaunchedServer) and _gone(server)
    # before training (step -1), then after steps 4 and 9
    assert [r["step"] for r in history if "eval_accuracy" in r] == [-1, 4, 9]
    kv = ("kv_cache",)
    assert trainer_memory == [("release_memory", kv)] + [("resume_memory", kv), ("release_memory", kv)] * 2


def test_server_mode_with_given_urls(tiny_model_dir, tmp_path, monkeypatch):
    """Servers given by URL are used as they are and left running; disk sync reaches them, and a
    distributed run forms one group of trainer + both servers (ranks 1, 2) and leaves none behind."""
    groups: list[str] = []
    close = DistributedPush.close

    def close_spy(self):
        groups.append(self.sender.group_name)
        close(self)
    monkeypatch.setattr(DistributedPush, "close", close_spy)
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path)
    servers = [LaunchedServer(cfg.model.engine.with_options(seed=cfg.seed), tmp_path / f"server{i}.log")
               for i in range(2)]
    try:
        probe = RemoteRollout([s.url for s in servers])
        for server, client in zip(servers, probe.clients):
            server.wait_ready(client)
        urls = "[" + ",".join(s.url for s in servers) + "]"
        history = toy_train(tiny_model_dir("tiny-llama"), tmp_path / "disk", "steps=2", "rollout.backend=server",
                            f"rollout.server_urls={urls}", "rollout.weight_sync=disk")
        assert [r["step"] for r in history] == [0, 1]
        assert probe.weight_versions() == ["1", "1"]
        history = toy_train(tiny_model_dir("tiny-llama"), tmp_path / "dist", "steps=3", "rollout.backend=server",
                            f"rollout.server_urls={urls}", "rollout.weight_sync=distributed",
                            "rollout.weight_sync_bucket_mb=1")
        assert [r["step"] for r in history] == [0, 1, 2]
        assert probe.weight_versions() == ["2", "2"] and all(c.health() for c in probe.clients)
        assert len(groups) == 1
        for client in probe.clients:               # destroyed on close: nothing left to destroy
            with pytest.raises(ServerError, match="no weight update group"):
                client.destroy_weights_update_group(groups[0])
        probe.close()
    finally:
        for server in servers:
            server.stop()
    assert all(_gone(s) for s in servers)
