"""Which shape a prompt validates as: token ids are strict ints, so strings of digits stay texts."""
from __future__ import annotations

import pydantic
import pytest

from rlserve.server import protocol as P


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2], [3]], "hi", ["12", "34"], ["a", "b"]])
def test_prompt_keeps_its_shape(prompt):
    assert P.CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


@pytest.mark.parametrize("prompt", [[-1], [[1], [2, -5]], [1 << 31]])
def test_out_of_range_ids_are_left_to_the_prompt_check(prompt):
    """The schema takes any int as a token id, so that the prompt check's 400 names the id (a bound in the
    union would fail every branch with a misleading message)."""
    assert P.CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


@pytest.mark.parametrize("prompt", [[1, "a"], [1.5], [1.0], [True], {"x": 1}, [[1], "a"]])
def test_bad_prompts_are_refused(prompt):
    with pytest.raises(pydantic.ValidationError):
        P.CompletionRequest.model_validate({"prompt": prompt})


def test_native_input_ids_single_and_batched():
    assert P.GenerateRequest.model_validate({"input_ids": [5, 6]}).input_ids == [5, 6]
    assert P.GenerateRequest.model_validate({"input_ids": [[5], [6, 7]]}).input_ids == [[5], [6, 7]]
    with pytest.raises(pydantic.ValidationError):
        P.GenerateRequest.model_validate({"input_ids": ["5"]})
