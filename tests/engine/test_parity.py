"""Greedy parity with transformers under every scheduling path: radix on/off, chunked prefill,
shared prefixes hitting the cache, and retraction under a tiny KV budget."""
from __future__ import annotations

import random

import pytest
from conftest import hf_greedy

from rlserve import LLM, SamplingParams

MAX_NEW = 10
SCENARIOS = {
    "radix": dict(chunked_prefill_size=200),  # several prefill steps, so later prompts find cached prefixes
    "no-radix": dict(enable_radix_cache=False),
    "chunked": dict(chunked_prefill_size=24),
    "retract": dict(max_total_tokens=400, chunked_prefill_size=64),
    "lpm": dict(schedule_policy="lpm", max_running_requests=8),
    # Overlapped decode runs the same logic on CPU (without real concurrency), so parity covers it.
    "overlap": dict(overlap_schedule=True, chunked_prefill_size=200, max_running_requests=12),
    "overlap-retract": dict(overlap_schedule=True, max_total_tokens=400, chunked_prefill_size=64),
}


def make_prompts(seed: int, vocab_hi: int = 10000) -> list[list[int]]:
    """32 prompts of mixed lengths; half share one of three prefixes so the cache gets hits."""
    rng = random.Random(seed)
    prefixes = [[rng.randint(10, vocab_hi) for _ in range(rng.randint(20, 40))] for _ in range(3)]
    prompts = []
    for i in range(32):
        tail = [rng.randint(10, vocab_hi) for _ in range(rng.randint(1, 45))]
        prompts.append((prefixes[i % 3] + tail) if i % 2 else tail)
    return prompts


_REFS: dict[str, list] = {}


def reference(path, prompts):
    key = str(path)
    if key not in _REFS:
        _REFS[key] = [hf_greedy(path, p, MAX_NEW) for p in prompts]
    return _REFS[key]


def check_parity(path, scenario: str) -> None:
    prompts = make_prompts(0)
    ref = reference(path, prompts)
    llm = LLM(str(path), **SCENARIOS[scenario])
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, (out, (tokens, lps)) in enumerate(zip(outs, ref)):
        got = out.outputs[0]
        assert got.token_ids == tokens, f"prompt {i}: {got.token_ids} != {tokens}"
        assert got.finish_reason == "length"
        mine = [next(iter(d.values())) for d in got.logprobs]
        assert max(abs(a - b) for a, b in zip(mine, lps)) < 1e-4
    engine = llm.engine
    status = engine.status()
    assert status.kv_leaked == 0
    if scenario in ("radix", "chunked", "lpm", "overlap"):
        assert status.counters.cached_tokens > 0, "shared prefixes should hit the radix cache"
    if scenario == "no-radix":
        assert status.counters.cached_tokens == 0
        assert status.kv_free == status.kv_total
    if scenario.startswith("overlap"):
        assert status.counters.overlapped_steps > 0
    else:
        assert status.counters.overlapped_steps == 0
    if scenario in ("retract", "overlap-retract"):
        assert status.retractions > 0, "the tiny KV budget should force retraction"
    if scenario == "chunked":
        assert any(len(p) > 24 for p in prompts)
    assert engine.flush_cache()
    assert engine.status().kv_free == status.kv_total


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_tiny_parity(tiny_model_dir, preset, scenario):
    check_parity(tiny_model_dir(preset), scenario)


@pytest.mark.parametrize("scenario", ["radix", "chunked", "retract"])
def test_smollm2_parity(default_model_dir, scenario):
    check_parity(default_model_dir, scenario)
