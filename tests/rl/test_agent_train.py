"""A multi-turn reward rises on a tiny random model (CPU, seconds a step): each turn is constrained to
either a call of the sandboxed python tool that prints "aaaa" or a four-letter a/b answer; a sample
scores the share of "a" in its answer, but only after it called the tool. The policy has to learn both
to call the tool first (rare at the start) and to answer with a's, across turns, through the loss mask."""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from rlserve.rl.config import load_config
from rlserve.rl.prompts import PromptStream
from rlserve.rl.train import train

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
