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


# ----------------------------------------------------------------------------- reading numbers

@pytest.mark.parametrize("text, want", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),                  # braces nested inside the box
    ("\\boxed{\\dfrac{3}{4}} and then \\boxed{{7}}", "{7}"),
    ("an unclosed \\boxed{\\frac{1}{2} and 5", "5"),
    ("the digits are 1,2,3", "3"),
    ("the answer is \u22123", "\u22123"),
    ("it is 1e5", "1e5"),
])
def test_extract_answer_nested_braces_and_number_forms(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("completion, answer, want", [
    ("\\boxed{\\frac{1}{2}}", 0.5, 1.0), ("\\boxed{\\frac{1}{2}}", "1/2", 1.0), ("\\boxed{\\frac{1}{2}}", 2, 0.0),
    ("\\boxed{-\\frac{3}{4}}", -0.75, 1.0), ("\\boxed{\\frac{-3}{4}}", "-3/4", 1.0), ("#### 1/2", 0.5, 1.0),
    ("\\boxed{1,2,3}", 123, 0.0), ("\\boxed{1,2,3}", 3, 0.0),   # a list is not a number
    ("#### 1,234", 1234, 1.0), ("#### 12,345,678", 12345678, 1.0),
    ("the answer is \u22123", -3, 1.0), ("the answer is \u22123", 3, 0.0), ("\\boxed{\u22127}", "-7", 1.0),
    ("it is 1e5", 100000, 1.0), ("it is 1e5", 5, 0.0), ("\\boxed{2.5e-3}", 0.0025, 1.0),
    ("\\boxed{$42$}", 42, 1.0), ("\\boxed{1/0}", 1, 0.0),
])
def test_numeric_reward_reads_fractions_signs_separators_and_exponents(completion, answer, want):
    assert numeric_reward("q", completion, answer=answer) == want


def test_format_reward_sees_a_box_with_nested_braces():
    assert format_reward("q", "x \\boxed{\\frac{1}{2}}") == 1.0
    assert format_reward("q", "x \\boxed{ unclosed") == 0.0


# ----------------------------------------------------------------------------- non-finite rewards

def test_a_non_finite_reward_is_an_error_naming_the_sample():
    import torch

    from rlserve.rl.rewards import invalid_reward_groups
    rewards = torch.tensor([1.0, 0.0, float("nan"), 1.0, 0.0, float("inf")])
    prompts = ["first prompt", "first prompt", "What is 2 + 2? " * 10, "x", "y", "z"]
    assert invalid_reward_groups(torch.tensor([1.0, 0.0]), 2, prompts.__getitem__) is None
    with pytest.raises(ValueError, match=r"sample 2 is nan .*2 non-finite.*prompt 'What is 2 \+ 2\? What is"):
        invalid_reward_groups(rewards, 2, prompts.__getitem__)
    keep = invalid_reward_groups(rewards, 2, prompts.__getitem__, on_invalid="drop")
    assert keep.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="on_invalid"):
        invalid_reward_groups(rewards, 2, prompts.__getitem__, on_invalid="ignore")
