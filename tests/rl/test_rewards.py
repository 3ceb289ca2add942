from __future__ import annotations

import asyncio

import pytest

from rlserve.rl.rewards import countdown_reward, extract_answer, format_reward, numeric_reward, score_batch


@pytest.mark.parametrize("text, want", [
    ("so the answer is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{7}", "7"),
    ("work...\n#### 1,234", "1,234"),
    ("3 apples and 5 pears make 8", "8"),
    ("no numbers here", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("completion, answer, want", [
    ("\\boxed{42}", 42, 1.0), ("#### 1,234", "1234", 1.0), ("it is 3.50", 3.5, 1.0),
    ("it is 3.51", 3.5, 0.0), ("\\boxed{-7}", -7, 1.0), ("nothing", 1, 0.0), ("\\boxed{12} 13", 13, 0.0),
])
def test_numeric_reward(completion, answer, want):
    assert numeric_reward("q", completion, answer=answer) == want


def test_format_reward():
    assert format_reward("q", "x \\boxed{1}") == 1.0
    assert format_reward("q", "<answer>3</answer>") == 1.0
    assert format_reward("q", "just 3") == 0.0


@pytest.mark.parametrize("completion, want", [
    ("<answer>(6 - 2) * 5</answer>", 1.0),
    ("<answer>5 * (6 - 2)</answer>", 1.0),
    ("<answer>6 * 5 - 2</answer>", 0.0),          # 28, wrong value
    ("<answer>(6 - 2) * 5 * 1</answer>", 0.0),    # 1 not given
    ("<answer>(6 - 2) * 5 + 5 - 5</answer>", 0.0),  # 5 used three times
    ("<answer>20</answer>", 0.0),                  # numbers unused
    ("<answer>__import__('os')</answer>", 0.0),
    ("<answer>(6 - 2) * 5 / 0</answer>", 0.0),
    ("thinking...\n(6-2)*5 = 20", 1.0),            # last line, before '='
])
def test_countdown_reward(completion, want):
    assert countdown_reward("q", completion, numbers=[6, 2, 5], target=20) == want


def test_score_batch_sync_and_async():
    async def slow_len(prompt, completion, **_):
        await asyncio.sleep(0.01)
        return len(completion)
    assert score_batch(slow_len, ["a", "b"], ["xy", "xyz"], [{}, {}]) == [2.0, 3.0]
    assert score_batch(numeric_reward, ["q"], ["\\boxed{2}"], [{"answer": 2}]) == [1.0]
    with pytest.raises(TypeError):
        score_batch(lambda p, c: "oops", ["q"], ["c"], [{}])
