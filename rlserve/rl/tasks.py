"""Synthetic verifiable tasks with fixed train / held-out splits.

Each sample is a dict: {"prompt": chat messages, plus the ground-truth fields its reward reads}.
Splits are decided by a hash of the problem itself, so a held-out problem never appears in training
whatever the seed or the number of samples drawn.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

Sample = dict[str, Any]


def _in_split(key: str, split: str, held_out_fraction: float) -> bool:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return (h < held_out_fraction) == (split == "test")


def arithmetic(split: str = "train", seed: int = 0, max_operand: int = 50, held_out_fraction: float = 0.2,
               ops: str = "+-", nonnegative: bool = False) -> Iterator[Sample]:
    """a ∘ b problems with operands in [0, max_operand] and ∘ drawn from `ops` (any of "+-*");
    `nonnegative` swaps a and b of a subtraction so that its answer is never negative.
    The reward field is `answer` (see rewards.numeric_reward).

    SmolLM2-135M-Instruct's greedy held-out accuracy (64 prompts, max_tokens 48–64): the default
    (± up to 50) ≈ 15%; max_operand=20 ≈ 30–34%; max_operand=20, nonnegative=True ≈ 45–47%."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops must be a non-empty string of '+', '-', '*'; got {ops!r}")
    if max_operand < 0:
        raise ValueError(f"max_operand must be ≥ 0, got {max_operand}")
    rng = random.Random(seed)
    while True:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice(ops)
        if nonnegative and op == "-" and a < b:
            a, b = b, a
        key = f"{a}{op}{b}"
        if not _in_split(key, split, held_out_fraction):
            continue
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        yield {"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? Put the final answer in \\boxed{{}}."}],
               "answer": answer}


def countdown(split: str = "train", seed: int = 0, num_numbers: int = 3, max_number: int = 20,
              held_out_fraction: float = 0.2) -> Iterator[Sample]:
    """Reach `target` from `numbers` with + - * / (each number once); reward: rewards.countdown_reward.
    Targets come from a random expression over the numbers, so every problem is solvable."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        value = numbers[0]
        for n in numbers[1:]:
            value = rng.choice([value + n, value - n, value * n])
        key = f"{sorted(numbers)}->{value}"
        if not _in_split(key, split, held_out_fraction):
            continue
        text = (f"Using the numbers {numbers} once each with + - * /, make {value}. "
                "Give the expression in <answer></answer>.")
        yield {"prompt": [{"role": "user", "content": text}], "numbers": numbers, "target": value}


def multiplication_tool(split: str = "train", seed: int = 0, **options: Any) -> Iterator[Sample]:
    """3-4 digit multiplication with the sandboxed Python tool (rlserve/rl/agent/tasks.py); needs
    rollout.agent.enabled."""
    from rlserve.rl.agent.tasks import multiplication
    return multiplication(split, seed, **options)


TASKS: dict[str, Callable[..., Iterator[Any]]] = {"arithmetic": arithmetic, "countdown": countdown,
                                                  "multiplication_tool": multiplication_tool}
