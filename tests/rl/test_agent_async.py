"""Agentic rollouts with asynchronous training (server mode): fully asynchronous training never trains on a
multi-turn sample whose oldest token is staler than the bound, whatever the turns' timings (a stand-in
drawer whose turns straddle weight pushes at random); one step off and fully asynchronous runs train end
to end on a launched server with the agent metrics logged (tests/rl/test_agent_train.py's task, smaller)."""
from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_agent_train import CALL, _prompts, tool_then_a

from rlserve.rl.agent.sample import AgentGroup, Sample, samples_to_rollout
from rlserve.rl.async_loop import FullAsync
from rlserve.rl.batch import Rollout
from rlserve.rl.config import load_config
from rlserve.rl.prompts import PromptStream
from rlserve.rl.train import Timer, train


class RandomTurns:
    """Stands in for the servers and the agent loop: each sample runs 1-3 turns at random times, each turn
    sampled by whichever version is served when it starts (a push may land between two turns)."""

    def __init__(self, seed: int, group_size: int) -> None:
        self.rng, self.n, self.version = random.Random(seed), group_size, 0
        self.spanning = 0        # samples drawn whose turns were sampled by more than one version

    def push_weights(self, llm: Any, version: int) -> float:
        time.sleep(self.rng.random() * 0.002)
        self.version = version
        return 0.0

    def draw(self, encoded: list[tuple[list[int], dict[str, Any]]], seed: int, version: int) -> list[AgentGroup]:
        groups = []
        for ids, _ in encoded:
            samples = [Sample(list(ids)) for _ in range(self.n)]
            for s in samples:
                for turn in range(self.rng.randint(1, 3)):
                    if turn:
                        s.append_context([7, 7])           # a tool result between turns
                        time.sleep(self.rng.random() * 0.003)
                    s.append_generated([1, 2], [-1.0, -1.0], [str(self.version)] * 2)
                s.status = "finished"
                s.turns = turn + 1
                self.spanning += len({v for v in s.weight_versions if v is not None}) > 1
            groups.append(AgentGroup(samples))
        return groups

    def rollout(self, groups: list[AgentGroup]) -> Rollout:
        samples = [s for g in groups for s in g.samples]
        return samples_to_rollout(samples, [""] * len(samples), self.n)


@pytest.mark.parametrize("seed", range(4))
def test_full_async_agent_samples_stay_within_the_bound(tmp_path, seed):
    rng = random.Random(seed)
    bound = rng.choice([0, 1, 2])
    cfg = load_config(None, [f"output_dir={tmp_path}", "asynchronous.mode=full", f"asynchronous.max_staleness={bound}",
                             f"asynchronous.groups_in_flight={rng.randint(1, 4)}", "task.prompts_per_step=3",
                             "rollout.group_size=4", "rollout.agent.enabled=true", "rollout.backend=server"])
    turns = RandomTurns(seed, 4)
    counter = iter(range(10**6))
    source = FullAsync(cfg, SimpleNamespace(), turns, lambda *a, **k: 0.0,   # type: ignore[arg-type]
                       lambda n: [([next(counter)], {}) for _ in range(n)], drawer=turns)
    try:
        for step in range(25):
            rollout, metrics = source.next(step, seed, Timer())
            assert rollout.num_groups == 3 and rollout.token_versions is not None
            on = rollout.mask.bool()
            for versions, m in zip(rollout.token_versions, on):
                sample_versions = versions[m]
                assert step - sample_versions.min().item() <= bound      # the sample's oldest token
            assert metrics["staleness_max"] <= bound and metrics["agent_finished"] == 12
            time.sleep(rng.random() * 0.005)             # the update
    finally:
        source.close()
    # Some samples' turns did straddle a push, so the per-sample bound was exercised; with a bound of 0
    # a chunk may start only once the step that takes it has pushed: none can straddle.
    assert (turns.spanning > 0) == (bound > 0)


def _agent_config(model: Path, out: Path, *overrides: str) -> Any:
    cfg = load_config(None, [f"model.path={model}", f"output_dir={out}", "task.prompts_per_step=2",
                             "task.eval_every=0", "rollout.group_size=4", "rollout.max_tokens=160",
                             "rollout.agent.enabled=true", "rollout.agent.max_turns=3",
                             "rollout.agent.max_turn_tokens=48", "rollout.agent.tool_timeout_s=20", "optim.lr=1e-2",
                             "logging.progress_bar=false", "rollout.backend=server", *overrides])
    cfg.rollout.constraint = {"regex": f"({CALL}|[ab]{{4}})"}
    return cfg


def _check_agent_metrics(history: list[dict[str, Any]]) -> None:
    for r in history:
        assert r["agent_finished"] + r["agent_truncated"] + r["agent_aborted"] == 8, r
        assert 1 <= r["agent_turns_mean"] <= 3 and r["agent_aborted"] == 0, r


def test_one_step_off_agent_run_trains_in_server_mode(tiny_model_dir, tmp_path):
    cfg = _agent_config(tiny_model_dir("tiny-llama"), tmp_path, "steps=4", "asynchronous.mode=one_step_off")
    history = train(cfg, reward_fn=tool_then_a, prompts=PromptStream(generator=lambda: _prompts(cfg.seed)))
    assert [r["step"] for r in history] == list(range(4))
    _check_agent_metrics(history)
    # step 0 draws its own rollout; every later one trains on samples drawn a version earlier, whole
    assert [r["staleness_max"] for r in history] == [0.0, 1.0, 1.0, 1.0]
    assert all(r["token_staleness_max"] == r["staleness_max"] and r["tokens_old_version"] == 0 for r in history)
    assert all("rollout_wait_s" in r for r in history[1:])
    assert all(r["groups_kept"] == 0 or r["optimizer_steps"] > 0 for r in history), history


def tool_then_a_noting_pid(prompt: str, completion: str, sample: Any = None, **fields: Any) -> float:
    """tool_then_a, leaving the scoring process's pid in $PID_NOTES (the draws score their samples)."""
    import os
    (Path(os.environ["PID_NOTES"]) / str(os.getpid())).touch()
    return tool_then_a(prompt, completion, sample, **fields)


@pytest.mark.parametrize("rollout_process", [False, True], ids=["draws-in-threads", "draws-in-a-process"])
def test_full_async_agent_run_trains_within_the_bound(tiny_model_dir, tmp_path, rollout_process, monkeypatch):
    import multiprocessing as mp
    import os

    notes = tmp_path / "pids"
    notes.mkdir()
    monkeypatch.setenv("PID_NOTES", str(notes))
    cfg = _agent_config(tiny_model_dir("tiny-llama"), tmp_path, "steps=3", "asynchronous.mode=full",
                        "asynchronous.max_staleness=1", "asynchronous.producers=2", "asynchronous.groups_in_flight=1",
                        f"asynchronous.rollout_process={str(rollout_process).lower()}")
    history = train(cfg, reward_fn=tool_then_a_noting_pid, prompts=PromptStream(generator=lambda: _prompts(cfg.seed)))
    assert [r["step"] for r in history] == list(range(3))
    _check_agent_metrics(history)
    # per token (hence per sample: its oldest token) and per group, nothing staler than the bound
    assert all(r["staleness_max"] <= 1 and r["token_staleness_max"] <= 1 for r in history), history
    scorers = {int(f.name) for f in notes.iterdir()}
    assert scorers == ({os.getpid()} if not rollout_process else scorers - {os.getpid()}) and scorers
    assert not [p for p in mp.active_children() if p.name == "rollout-draws"]     # the run stopped its child


def test_config_takes_agents_with_servers_and_async_and_refuses_what_cannot_work(tmp_path):
    base = [f"output_dir={tmp_path}", "rollout.agent.enabled=true"]
    for extra in ([], ["rollout.backend=server"], ["rollout.backend=server", "asynchronous.mode=one_step_off"],
                  ["rollout.backend=server", "asynchronous.mode=full", "asynchronous.max_staleness=2"]):
        cfg = load_config(None, base + extra)
        assert cfg.rollout.agent.enabled
    assert load_config(None, ["asynchronous.mode=off"]).asynchronous.mode == "off"     # YAML reads off as false
    with pytest.raises(ValueError, match="agent does not combine with rollout.over_sample"):
        load_config(None, base + ["rollout.backend=server", "rollout.over_sample=1.5"])
    with pytest.raises(ValueError, match="agent does not combine"):
        load_config(None, base + ["rollout.partial=true"])
    # over-sampling: colocated or server, synchronous steps only
    load_config(None, ["rollout.backend=server", "rollout.over_sample=1.5"])
    with pytest.raises(ValueError, match="shape synchronous steps"):
        load_config(None, ["rollout.backend=server", "rollout.over_sample=1.5", "asynchronous.mode=full"])
