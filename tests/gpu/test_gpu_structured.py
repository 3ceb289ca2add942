"""Constrained decoding on the GPU: the grammar's bitmask applied inside the sampling kernel draws the
same tokens as logits masked beforehand, and every output fits its constraint (run with `-m gpu`)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from rlserve import LLM, SamplingParams  # noqa: E402

# The structured-output benchmark's object (benchmarks/structured.py).
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}

PATTERN = r"[a-z]{3,8}-\d{2}(\.[A-Z]{1,3})?"


@pytest.fixture(scope="module")
def llm(default_model_dir) -> LLM:
    return LLM(dtype="bfloat16")


def _params() -> list[SamplingParams]:
    regex = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, regex=PATTERN) for i in range(24)]
    schema = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=200, json_schema=SCHEMA) for i in range(24)]
    greedy = [SamplingParams(temperature=0.0, max_tokens=32, regex=PATTERN) for _ in range(4)]
    return regex + schema + greedy


def test_bitmask_in_the_sampling_kernel_matches_masked_logits(llm, monkeypatch):
    import rlserve.engine.sampler as sampler_module
    prompt = llm.apply_chat_template([{"role": "user", "content": "Give me a code, then a person as JSON."}])
    params = _params()
    fused_calls = []
    kernel = sampler_module.gumbel_argmax

    def spy(logits, temps, seeds, bitmask=None):
        fused_calls.append(bitmask is not None)
        return kernel(logits, temps, seeds, bitmask)

    monkeypatch.setattr(sampler_module, "gumbel_argmax", spy)
    # Both runs start from an empty prefix cache: a cached prompt is prefilled by other kernels, whose
    # bf16 rounding may tip a near-tied draw.
    llm.engine.flush_cache()
    fused = llm.generate([prompt] * len(params), params, use_tqdm=False)
    assert sum(fused_calls) > 20                      # the decode steps took the mask in the kernel
    monkeypatch.setattr(llm.engine.sampler, "fuses_bitmask", lambda rows: False)
    fused_calls.clear()
    llm.engine.flush_cache()
    masked = llm.generate([prompt] * len(params), params, use_tqdm=False)
    assert not any(fused_calls)
    assert [o.outputs[0].token_ids for o in fused] == [o.outputs[0].token_ids for o in masked]
    for out, p in zip(fused, params):
        c = out.outputs[0]
        if p.regex is not None:
            assert re.fullmatch(PATTERN, c.text), c.text
        elif c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert sum(o.outputs[0].finish_reason == "stop" for o in fused[24:48]) >= 12
    assert llm.engine.kv_leaked() == 0


def test_masks_from_the_helper_process_match_masks_filled_in_the_engine(llm):
    """On CUDA the grammar masks come from a helper process (pinned shared memory, asynchronous copy);
    an engine that fills them itself draws the same tokens."""
    import time
    grammar = llm.engine.grammar
    grammar.start()                    # the compiler and helpers now, not with the first constraint
    status = grammar.status()
    assert status.helpers > 0 and status.pinned
    deadline = time.monotonic() + 120
    while not grammar.helpers_ready():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    own = LLM(dtype="bfloat16", gpu_memory_fraction=0.5, grammar_helpers=0)
    prompt = llm.apply_chat_template([{"role": "user", "content": "Give me a code, then a person as JSON."}])
    params = _params()
    before = grammar.status().helper_requests
    outs = {}
    for name, engine in (("helper", llm), ("own", own)):
        engine.engine.flush_cache()
        outs[name] = [o.outputs[0].token_ids for o in engine.generate([prompt] * len(params), params, use_tqdm=False)]
    status = grammar.status()
    assert status.helper_requests - before > 20 and status.helpers > 0 and status.helpers_given_up == 0
    assert own.engine.grammar.status().helpers == 0
    assert outs["helper"] == outs["own"]
    assert llm.engine.kv_leaked() == 0 and own.engine.kv_leaked() == 0
