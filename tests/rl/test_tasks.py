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
