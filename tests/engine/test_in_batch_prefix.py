"""Requests that arrive together with a shared prompt prefix: one computes it, the others wait a step
and read it from the prefix cache; outputs stay those of the engine without a prefix cache."""
from __future__ import annotations

import random

from rlserve import LLM, SamplingParams


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [[rng.randint(10, 20000) for _ in range(300)] for _ in range(2)]
    return [shared[i % 2] + [rng.randint(10, 20000) for _ in range(20 + i)] for i in range(8)]


def test_shared_prefix_in_one_batch_is_computed_once(tiny_model_dir):
    model = str(tiny_model_dir("tiny-llama"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model, chunked_prefill_size=8192)              # all eight would fit in one prefill step
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    # two groups of four: the first of each computes its 300-token prefix, the three others reuse it
    assert sorted(o.cached_tokens for o in outs) == [0, 0] + [300] * 6
    assert llm.engine.status().counters.prompt_tokens == sum(len(p) for p in _prompts()) - 6 * 300
    ref = LLM(model, enable_radix_cache=False).generate(_prompts(), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert llm.engine.kv_leaked() == 0


def test_prompt_logprob_requests_are_not_deferred(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("tiny-llama")), chunked_prefill_size=8192)
    outs = llm.generate(_prompts()[:4], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0),
                        use_tqdm=False)
    assert all(o.cached_tokens == 0 and len(o.prompt_logprobs) == len(o.prompt_token_ids) for o in outs)
