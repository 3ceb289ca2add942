"""Rewards: plain callables `fn(prompt, completion, **sample_fields) -> float` (async allowed).

Built-ins: an exact numeric answer (from `\\boxed{}`, `#### x`, or the last number), a format reward,
and the countdown checker (an arithmetic expression using the given numbers that hits the target).
"""
from __future__ import annotations

import ast
import asyncio
import inspect
import operator
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., Any]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last \\boxed{...}, else what follows '####', else the
    last number in the text."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(text: str | None) -> float | None:
    if text is None:
        return None
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_reward(prompt: str, completion: str, answer: Any = None, **_: Any) -> float:
    """1.0 when the completion's final answer equals `answer` as a number, else 0.0."""
    got, want = _as_number(extract_answer(completion)), _as_number(str(answer))
    return float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))


def format_reward(prompt: str, completion: str, **_: Any) -> float:
    """1.0 when the completion states its answer in a recognised form (\\boxed{}, '####', <answer>)."""
    return float(bool(_BOXED.search(completion) or _HASHES.search(completion) or _ANSWER_TAG.search(completion)))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST, used: list[int]) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return float(node.value)
    raise ValueError("only integers, + - * / and parentheses are allowed")


def countdown_reward(prompt: str, completion: str, numbers: list[int] | None = None, target: int | None = None,
                     **_: Any) -> float:
    """1.0 when the expression in <answer>...</answer> (else the last line) uses each given number exactly
    once, nothing else, and evaluates to `target`."""
    if numbers is None or target is None:
        raise ValueError("countdown_reward needs the sample fields 'numbers' and 'target'")
    tags = _ANSWER_TAG.findall(completion)
    expr = (tags[-1] if tags else (completion.strip().splitlines() or [""])[-1]).split("=")[0].strip()
    if not expr or not re.fullmatch(r"[\d\s+\-*/()]+", expr):
        return 0.0
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(expr, mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    return float(Counter(used) == Counter(numbers) and abs(value - target) < 1e-6)


BUILTIN_REWARDS: dict[str, RewardFn] = {"numeric": numeric_reward, "format": format_reward,
                                        "countdown": countdown_reward}


async def score(fn: RewardFn, prompt: str, completion: str, fields: dict[str, Any]) -> float:
    """Call a reward, sync or async; its result must be a real number."""
    out = fn(prompt, completion, **fields)
    if inspect.isawaitable(out):
        out = await out
    if isinstance(out, bool) or not isinstance(out, (int, float)):
        raise TypeError(f"reward {getattr(fn, '__name__', fn)!r} returned {out!r}, not a number")
    return float(out)


def score_batch(fn: RewardFn, prompts: list[str], completions: list[str], fields: list[dict[str, Any]]) -> list[float]:
    """Score many samples; async rewards run concurrently."""
    async def run() -> list[float]:
        return list(await asyncio.gather(*(score(fn, p, c, f) for p, c, f in zip(prompts, completions, fields))))
    return asyncio.run(run())
