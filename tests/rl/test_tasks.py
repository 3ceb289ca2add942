from __future__ import annotations

import itertools

import pytest

from rlserve.rl.rewards import countdown_reward, numeric_reward
from rlserve.rl.tasks import arithmetic, countdown


def take(it, n):
    return list(itertools.islice(it, n))


@pytest.mark.parametrize("task", [arithmetic, countdown])
def test_splits_are_disjoint_and_reproducible(task):
    train = take(task("train", seed=1), 300)
    test = take(task("test", seed=2), 100)
    key = lambda s: s["prompt"][0]["content"]
    assert not {key(s) for s in train} & {key(s) for s in test}
    assert [key(s) for s in take(task("train", seed=1), 20)] == [key(s) for s in train[:20]]
    assert [key(s) for s in take(task("train", seed=3), 20)] != [key(s) for s in train[:20]]
    with pytest.raises(ValueError):
        next(task("validation"))


def test_arithmetic_answers_are_right():
    for s in take(arithmetic(seed=0), 50):
        q = s["prompt"][0]["content"]
        a, op, b = q.removeprefix("What is ").split("?")[0].split()
        assert s["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert numeric_reward(q, f"\\boxed{{{s['answer']}}}", answer=s["answer"]) == 1.0


def test_countdown_targets_are_reachable():
    # Each problem was built from a left-to-right expression over the numbers; brute force finds one.
    from itertools import permutations, product
    for s in take(countdown(seed=0), 20):
        found = False
        for perm in permutations(s["numbers"]):
            for ops in product("+-*", repeat=len(perm) - 1):
                expr = str(perm[0])
                for op, n in zip(ops, perm[1:]):
                    expr = f"({expr} {op} {n})"
                if countdown_reward("", f"<answer>{expr}</answer>", numbers=s["numbers"], target=s["target"]):
                    found = True
                    break
            if found:
                break
        assert found, s


def test_arithmetic_defaults_are_unchanged():
    # The knobs' defaults draw the same problems as before they existed (± with operands ≤ 50).
    import random
    rng, want = random.Random(0), []
    while len(want) < 5:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        op = rng.choice("+-")
        want.append((a, op, b))
    got = [s["prompt"][0]["content"] for s in take(arithmetic("train", seed=0, held_out_fraction=0.0), 5)]
    assert got == [f"What is {a} {op} {b}? Put the final answer in \\boxed{{}}." for a, op, b in want]


def _parse(s):
    a, op, b = s["prompt"][0]["content"].removeprefix("What is ").split("?")[0].split()
    return int(a), op, int(b)


@pytest.mark.parametrize("split", ["train", "test"])
def test_arithmetic_knobs(split):
    samples = take(arithmetic(split, seed=0, max_operand=20, ops="+-*", nonnegative=True), 300)
    seen_ops = set()
    for s in samples:
        a, op, b = _parse(s)
        seen_ops.add(op)
        assert 0 <= a <= 20 and 0 <= b <= 20
        assert s["answer"] == {"+": a + b, "-": a - b, "*": a * b}[op] and s["answer"] >= 0
        assert numeric_reward("", f"\\boxed{{{s['answer']}}}", answer=s["answer"]) == 1.0
    assert seen_ops == set("+-*")
    assert {_parse(s)[1] for s in take(arithmetic(split, ops="*"), 50)} == {"*"}
    # Without `nonnegative`, subtraction goes below zero.
    assert any(s["answer"] < 0 for s in take(arithmetic(split, max_operand=20), 300))


def test_arithmetic_knob_splits_are_disjoint():
    opts = dict(max_operand=20, nonnegative=True)
    key = lambda s: s["prompt"][0]["content"]
    train = {key(s) for s in take(arithmetic("train", seed=1, **opts), 500)}
    test = {key(s) for s in take(arithmetic("test", seed=2, **opts), 200)}
    assert train and test and not train & test


@pytest.mark.parametrize("bad", [dict(ops=""), dict(ops="+/"), dict(max_operand=-1)])
def test_arithmetic_rejects_bad_knobs(bad):
    with pytest.raises(ValueError):
        next(arithmetic(**bad))
