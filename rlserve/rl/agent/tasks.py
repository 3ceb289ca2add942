"""A task that needs a tool: multiplying 3-4 digit numbers, which a 135M model cannot do in its head,
with the sandboxed Python tool described in the system prompt. Held-out problems are split off by a
hash of the problem (as rlserve/rl/tasks.py does)."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

from rlserve.rl.agent.spawner import python_tool
from rlserve.rl.rewards import tool_answer_reward  # the built-in reward "tool_answer"
from rlserve.tool_parsing import tools_system_prompt

Sample = dict[str, Any]
__all__ = ["multiplication", "tool_answer_reward"]


def _in_split(key: str, split: str, held_out_fraction: float) -> bool:
    # rlserve/rl/tasks.py's split (kept here: that module lists this task, so it cannot be imported)
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return (h < held_out_fraction) == (split == "test")


def multiplication(split: str = "train", seed: int = 0, min_digits: int = 3, max_digits: int = 4,
                   held_out_fraction: float = 0.2, tool_format: str = "tool_call") -> Iterator[Sample]:
    """"What is a × b?" with a and b of min_digits..max_digits digits; the reward field is `answer`.
    tool_format "tool_call": the system prompt offers the `python` tool in the Qwen-style <tool_call>
    format (rollout.agent.tool_parser: qwen); "markdown": the model is told that a ```python block is
    run and its output shown (tool_parser: markdown)."""
    if tool_format not in ("tool_call", "markdown"):
        raise ValueError(f"tool_format must be 'tool_call' or 'markdown', got {tool_format!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 ≤ min_digits ≤ max_digits; got {min_digits}, {max_digits}")
    system = tools_system_prompt([python_tool().spec]) if tool_format == "tool_call" else (
        "You can run Python: write code in a ```python block and stop; its output is shown to you. "
        "Then give the final answer in \\boxed{}.")
    rng = random.Random(seed)
    while True:
        a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1)
                for d in (rng.randint(min_digits, max_digits) for _ in range(2)))
        if not _in_split(f"{a}*{b}", split, held_out_fraction):
            continue
        tool = "the python tool" if tool_format == "tool_call" else "Python"
        question = f"What is {a} * {b}? Use {tool} to compute it, then give the final answer in \\boxed{{}}."
        yield {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": question}],
               "answer": a * b}
