"""asynchronous.rollout_process: draws answered by a child process, each to its own caller; a draw that
fails there, or a child that dies, fails the caller with a clear error instead of hanging it; close stops
the child."""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from rlserve.rl.draw_process import DrawerSpec, ProcessDrawer


class EchoDrawer:
    """Each prompt's ids reversed, with the seed, the version and where it was drawn (pid, thread);
    a prompt's fields can make the draw sleep, raise or end the process."""

    def draw(self, encoded: list[tuple[list[int], dict[str, Any]]], seed: int, version: int) -> list[Any]:
        out = []
        for ids, fields in encoded:
            action = fields.get("action")
            if action == "raise":
                raise ValueError("a bad prompt")
            if action == "exit":
                os._exit(3)
            if action == "sleep":
                time.sleep(fields["s"])
            out.append((ids[::-1], seed, version, os.getpid(), threading.get_ident()))
        return out

    def rollout(self, groups: list[Any]) -> Any:
        return ("local", groups)


@pytest.fixture
def drawer():
    d = ProcessDrawer(EchoDrawer(), EchoDrawer, threads=4)
    yield d
    d.close()


def test_concurrent_draws_each_get_their_own_answer_from_the_child(drawer):
    answers: dict[int, Any] = {}

    def call(i: int) -> None:
        answers[i] = drawer.draw([([i, i + 1, i + 2], {"action": "sleep", "s": 0.3})], seed=100 + i, version=i % 3)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == list(range(6))
    for i, [(ids, seed, version, pid, _)] in answers.items():
        assert (ids, seed, version) == ([i + 2, i + 1, i], 100 + i, i % 3)
        assert pid == drawer.process.pid != os.getpid()
    assert len({a[0][4] for a in answers.values()}) > 1       # several of the child's threads drew at once
    assert drawer.rollout(["g"]) == ("local", ["g"])             # rollouts are made here, by the local drawer


def test_a_failing_draw_fails_its_caller_with_the_childs_traceback_and_the_child_keeps_serving(drawer):
    with pytest.raises(RuntimeError, match=r"(?s)failed in the rollout process.*ValueError: a bad prompt"):
        drawer.draw([([1], {"action": "raise"})], 0, 0)
    assert drawer.draw([([1, 2], {})], 5, 1)[0][:3] == ([2, 1], 5, 1)


def test_a_child_that_dies_fails_the_waiting_draw_and_every_later_one(drawer):
    with pytest.raises(RuntimeError, match=r"exited \(code 3\)"):
        drawer.draw([([1], {"action": "exit"})], 0, 0)
    with pytest.raises(RuntimeError, match="closed"):
        drawer.draw([([1], {})], 0, 0)


def test_close_stops_the_child_after_its_draws_in_flight():
    d = ProcessDrawer(EchoDrawer(), EchoDrawer, threads=2)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=d.draw([([7], {"action": "sleep", "s": 1.0})], 1, 2)))
    t.start()
    time.sleep(0.3)                      # the draw is in the child
    d.close()
    t.join(30)
    assert result["r"][0][:3] == ([7], 1, 2)             # answered before the child stopped
    assert not d.process.is_alive() and d.process.exitcode == 0
    with pytest.raises(RuntimeError, match="closed"):
        d.draw([([1], {})], 0, 0)


def test_the_spec_builds_the_runs_drawer_without_an_engine(tokenizer_dir):
    from transformers import AutoTokenizer

    from rlserve.rl.agent.rollout import AgentDrawer
    from rlserve.rl.config import load_config
    from rlserve.rl.drawers import SingleTurn

    cfg = load_config(None, ["rollout.backend=server"])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    single = DrawerSpec(cfg.rollout, ["http://127.0.0.1:9"], None, None, len, tok)()
    assert isinstance(single, SingleTurn) and single.remote.urls == ["http://127.0.0.1:9"]
    cfg = load_config(None, ["rollout.backend=server", "rollout.agent.enabled=true"])
    agent = DrawerSpec(cfg.rollout, ["http://127.0.0.1:9"], "key", None, len, tok)()
    assert isinstance(agent, AgentDrawer) and agent.llm is None and agent.tokenizer is not tok
    with pytest.raises(RuntimeError, match="draws only"):
        agent.rollout([])


def test_a_reward_that_does_not_pickle_is_refused_at_start():
    from types import SimpleNamespace

    from rlserve.rl.config import load_config
    from rlserve.rl.draw_process import process_drawer

    cfg = load_config(None, ["rollout.backend=server", "asynchronous.mode=full", "asynchronous.rollout_process=true"])
    remote = SimpleNamespace(router=None, clients=[], urls=["http://127.0.0.1:9"])
    with pytest.raises(ValueError, match="rollout_process.*does not pickle"):
        process_drawer(cfg, None, remote, lambda *a: 0.0, 1)   # type: ignore[arg-type]
