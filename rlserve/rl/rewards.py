"""Rewards: plain callables `fn(prompt, completion, **sample_fields) -> float` (async allowed).

Built-ins: an exact numeric answer (from `\\boxed{}`, `#### x`, or the last number), a format reward,
the countdown checker (an arithmetic expression using the given numbers that hits the target), and
tool_answer for agentic rollouts (the numeric answer plus a bonus for calling a tool first).
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

import torch

RewardFn = Callable[..., Any]

# A number: digits with thousands separators only in valid groups ("1,234", not "1,2,3"), an optional
# fraction and exponent, and an ASCII or Unicode minus ("−3", U+2212, as typeset math and some tokenizers
# write it).
_MINUS = "-\u2212"
_NUMBER = re.compile(rf"(?<![\d.])[{_MINUS}]?(?:\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
                     rf"|(?<![\d.])[{_MINUS}]?\.\d+(?:[eE][-+]?\d+)?")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\$")


def boxed_contents(text: str) -> list[str]:
    """The contents of every \\boxed{...} in order, braces nested inside counted (\\boxed{\\frac{1}{2}}
    is "\\frac{1}{2}"). An unclosed box is skipped."""
    found = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append(text[start:i])
                break
    return found


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last \\boxed{...}, else what follows '####', else the
    last number in the text."""
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _to_float(token: str) -> float:
    return float(token.replace(",", "").replace("\u2212", "-"))


def _as_number(text: str | None) -> float | None:
    """An answer as a number: the whole answer when it is one ("1,234", "−3", "1e5", "\\frac{1}{2}",
    "1/2"), None for a list of numbers ("1,2,3"), else the last number in it ("x = 5")."""
    if text is None:
        return None
    plain = _FRAC.sub(r"(\1)/(\2)", _LATEX_NOISE.sub("", text)).strip().rstrip(".").strip()
    plain = plain.replace("{", "").replace("}", "")
    num = _NUMBER.pattern
    fraction = re.fullmatch(rf"([{_MINUS}]?)\(?\s*({num})\s*\)?\s*/\s*\(?\s*({num})\s*\)?", plain)
    try:
        if re.fullmatch(num, plain):
            return _to_float(plain)
        if fraction:
            value = _to_float(fraction.group(2)) / _to_float(fraction.group(3))
            return -value if fraction.group(1) else value
        if re.fullmatch(rf"(?:{num})(?:\s*,\s*(?:{num}))+", plain):
            return None                  # a list is not one number
        found = _NUMBER.findall(plain)
        return _to_float(found[-1]) if found else None
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def numeric_reward(prompt: str, completion: str, answer: Any = None, **_: Any) -> float:
    """1.0 when the completion's final answer equals `answer` as a number, else 0.0."""
    got, want = _as_number(extract_answer(completion)), _as_number(str(answer))
    return float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))


def format_reward(prompt: str, completion: str, **_: Any) -> float:
    """1.0 when the completion states its answer in a recognised form (\\boxed{}, '####', <answer>)."""
    return float(bool(boxed_contents(completion) or _HASHES.search(completion) or _ANSWER_TAG.search(completion)))


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


def tool_answer_reward(prompt: str, completion: str, answer: Any = None, sample: Any = None,
                       format_weight: float = 0.1, **_: Any) -> float:
    """The final answer's correctness (numeric_reward on the last assistant turn) plus a small format
    reward: `format_weight` when the sample called a tool and then answered in \\boxed{}. `sample` is the
    agent's Sample (rl/agent/sample.py; agentic rollouts pass it to a reward that takes it), read by
    attribute so that this module does not import the agent package."""
    correct = numeric_reward(prompt, completion, answer)
    used_tool = sample is not None and sample.tool_calls > 0 and sample.status == "finished"
    return correct + (format_weight if used_tool and boxed_contents(completion) else 0.0)


BUILTIN_REWARDS: dict[str, RewardFn] = {"numeric": numeric_reward, "format": format_reward,
                                        "countdown": countdown_reward, "tool_answer": tool_answer_reward}


INVALID_REWARD_ACTIONS = ("error", "drop")


def invalid_reward_groups(rewards: torch.Tensor, group_size: int, prompt_of: Callable[[int], str],
                          on_invalid: str = "error") -> torch.Tensor | None:
    """Guard the advantages against a NaN or infinite reward, which would turn every advantage of its
    group into NaN (the group mean and std take it in) and from there the loss and the weights.

    → None when every reward is finite, else (on_invalid="drop") the groups to keep, bool [num_groups].
    on_invalid="error" raises ValueError naming the first bad sample: its index and its prompt's start."""
    if on_invalid not in INVALID_REWARD_ACTIONS:
        raise ValueError(f"on_invalid must be one of {', '.join(INVALID_REWARD_ACTIONS)}; got {on_invalid!r}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if not bad:
        return None
    if on_invalid == "error":
        i = bad[0]
        prompt = prompt_of(i)
        prompt = prompt if len(prompt) <= 80 else prompt[:80] + "..."
        raise ValueError(f"reward of sample {i} is {rewards[i].item()} ({len(bad)} non-finite in the step), "
                         f"prompt {prompt!r}; fix the reward function or set task.on_invalid_reward=drop "
                         f"to drop such groups")
    keep = torch.ones(len(rewards) // group_size, dtype=torch.bool)
    keep[[i // group_size for i in bad]] = False
    return keep


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
