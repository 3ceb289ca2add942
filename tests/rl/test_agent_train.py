"""A multi-turn reward rises on a tiny random model (CPU, seconds a step): each turn is constrained to
either a call of the sandboxed python tool that prints "aaaa" or a four-letter a/b answer; a sample
scores the share of "a" in its answer, but only after it called the tool. The policy has to learn both
to call the tool first (rare at the start) and to answer with a's, across turns, through the loss mask."""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlserve.rl.agent.sample import Sample, agent_metrics
from rlserve.rl.config import load_config
from rlserve.rl.prompts import PromptStream
from rlserve.rl.rewards import BUILTIN_REWARDS, tool_answer_reward
from rlserve.rl.train import train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent_calculator.yaml"

CALL = r'<tool_call>\{"name": "python", "arguments": \{"code": "print\(4 \* .a.\)"\}\}</tool_call>'


def tool_then_a(prompt: str, completion: str, sample: Any = None, **_: Any) -> float:
    if sample is None or sample.tool_calls == 0 or sample.status != "finished":
        return 0.0
    return completion.count("a") / 4


def _prompts(seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    words = ["red", "green", "blue", "sky", "sea", "stone", "tree", "wind"]
    while True:
        yield {"prompt": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(5))}]}


def test_multi_turn_reward_rises_with_tool_use(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"model.path={tiny_model_dir('tiny-llama')}", f"output_dir={tmp_path}", "steps=12",
                             "task.prompts_per_step=4", "task.eval_every=0", "rollout.group_size=8",
                             "rollout.max_tokens=160", "rollout.agent.enabled=true", "rollout.agent.max_turns=3",
                             "rollout.agent.max_turn_tokens=48", "rollout.agent.tool_timeout_s=20",
                             "optim.lr=1e-2", "logging.progress_bar=false"])
    cfg.rollout.constraint = {"regex": f"({CALL}|[ab]{{4}})"}
    history = train(cfg, reward_fn=tool_then_a, prompts=PromptStream(generator=lambda: _prompts(cfg.seed)))
    rewards = [r["reward"] for r in history]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert start < 0.1 and end > 0.3, rewards          # ~0.02 → ~0.45
    # every step logs the agent metrics over its 4 · 8 samples, dynamic sampling or not
    for r in history:
        assert r["agent_finished"] + r["agent_truncated"] + r["agent_aborted"] == 32, r
        assert 1 <= r["agent_turns_mean"] <= 3 and 0 <= r["agent_tool_calls_mean"] <= 2, r
        assert 0 <= r["agent_tool_errors"] <= 32 * r["agent_tool_calls_mean"], r
        assert r["agent_aborted"] == 0, r               # nothing aborts a synchronous rollout
    # a reward above 0.3 needs tool calls: the late steps make them
    assert all(r["agent_tool_calls_mean"] > 0 for r in history[-3:]), history[-3:]


def test_agent_metrics_count_turns_calls_errors_and_statuses():
    samples = [Sample([1], status="finished", turns=2, tool_calls=1, tool_errors=1),
               Sample([1], status="truncated", turns=3, tool_calls=2),
               Sample([1], status="finished", turns=1)]
    assert agent_metrics(samples) == {"agent_turns_mean": 2.0, "agent_tool_calls_mean": 1.0,
                                      "agent_tool_errors": 1.0, "agent_finished": 2.0,
                                      "agent_truncated": 1.0, "agent_aborted": 0.0}


def test_tool_answer_reward_is_a_builtin_and_the_example_uses_it():
    cfg = load_config(str(EXAMPLE), [])
    assert cfg.task.reward == "tool_answer" and BUILTIN_REWARDS[cfg.task.reward] is tool_answer_reward
    used = Sample([1], status="finished", tool_calls=1)
    assert tool_answer_reward("q", "\\boxed{42}", answer=42, sample=used) == 1.1
    assert tool_answer_reward("q", "\\boxed{41}", answer=42, sample=used) == 0.1
    assert tool_answer_reward("q", "\\boxed{42}", answer=42, sample=Sample([1], status="finished")) == 1.0
    assert tool_answer_reward("q", "\\boxed{42}", answer=42) == 1.0
