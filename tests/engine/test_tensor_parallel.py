"""Tensor parallelism in the engine on real processes (gloo): rank 0 schedules and samples, worker ranks
run the forwards it broadcasts. At 2 ranks (and 4 for a model with fewer K/V heads than that: K/V heads
replicated) greedy tokens equal one rank's and logprobs agree within 1e-5 in fp32, under a small KV budget
that makes the scheduler chunk prefills, hit the radix cache and retract; a weight update of full HF
tensors reaches every rank; releasing and resuming memory empties and refills every rank's weights and
KV pool, and the engine then answers exactly as before."""
from __future__ import annotations

import random

import pytest
import torch

from rlserve import LLM, SamplingParams
from rlserve.engine.lifecycle import tp_workers
from rlserve.models.loader import iter_safetensors

MAX_NEW = 8
# Chunked prefill, the radix cache (shared prefixes) and retraction (a KV pool too small for all).
OPTIONS = dict(max_total_tokens=400, chunked_prefill_size=48, dtype="float32", device="cpu")
PARAMS = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    prefix = [rng.randint(10, 10000) for _ in range(40)]
    return [(prefix if i % 2 else []) + [rng.randint(10, 10000) for _ in range(rng.randint(3, 40))] for i in range(16)]


def generate(llm: LLM) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(prompts(), PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, [next(iter(d.values())) for d in o.outputs[0].logprobs]) for o in outs]


def assert_same(got: list, want: list) -> None:
    for i, ((tokens, lps), (ref_tokens, ref_lps)) in enumerate(zip(got, want)):
        assert tokens == ref_tokens, f"prompt {i}"
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-5, f"prompt {i}"


def perturbed(path) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, unsharded, each moved a little (what a trainer would send)."""
    gen = torch.Generator().manual_seed(7)
    return [(n, t + 0.05 * torch.randn(t.shape, generator=gen)) for n, t in iter_safetensors(path)]


def check(path, size: int, update: bool, **options) -> None:
    one = LLM(str(path), **OPTIONS)
    ref = generate(one)
    llm = LLM(str(path), tensor_parallel_size=size, **OPTIONS, **options)
    try:
        assert_same(generate(llm), ref)
        status = llm.engine.status()
        assert status.retractions > 0 and status.counters.cached_tokens > 0 and status.kv_leaked == 0
        if update:
            weights = perturbed(path)
            one.engine.update_weights(weights, weight_version="v1")
            llm.engine.update_weights(weights, weight_version="v1")
            after = generate(llm)
            assert after != ref
            assert_same(after, generate(one))
            # Sliced parameters read back whole: vocabulary rows, K/V heads, row-parallel input features.
            for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight",
                         "model.layers.0.mlp.down_proj.weight"):
                assert llm.engine.get_weights_by_name(name, 1000) == one.engine.get_weights_by_name(name, 1000)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_two_ranks_match_one(tiny_model_dir, preset):
    # Llama's run overlaps scheduling with the forward: decode inputs stay on rank 0's device.
    overlap = {"overlap_schedule": "on"} if preset == "tiny-llama" else {}
    check(tiny_model_dir(preset), 2, update=preset == "tiny-qwen2", **overlap)


def test_four_ranks_replicate_kv_heads(tiny_model_dir):
    """4 query heads and 2 K/V heads over 4 ranks: each K/V head lives on two ranks."""
    check(tiny_model_dir("tiny-qwen3"), 4, update=True)


def test_release_and_resume_reach_every_rank(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("tiny-qwen2")), tensor_parallel_size=2, **OPTIONS)
    try:
        engine = llm.engine
        workers = tp_workers(engine)
        assert workers is not None
        before = generate(llm)
        names = ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight")   # a piece on each rank
        weights = [engine.get_weights_by_name(n, 1000) for n in names]
        (held,) = workers.resident_bytes()
        assert held["weights"] > 0 and held["kv_cache"] > 0
        engine.release_memory("weights")
        assert workers.resident_bytes() == [{"weights": 0, "kv_cache": held["kv_cache"]}]
        engine.release_memory()
        assert workers.resident_bytes() == [{"weights": 0, "kv_cache": 0}]
        with pytest.raises(RuntimeError, match="released"):
            engine.get_weights_by_name(names[0])
        engine.resume_memory("kv_cache")
        assert workers.resident_bytes() == [{"weights": 0, "kv_cache": held["kv_cache"]}]
        engine.resume_memory()
        assert workers.resident_bytes() == [held] and engine.released_memory() == set()
        assert [engine.get_weights_by_name(n, 1000) for n in names] == weights
        assert generate(llm) == before          # exactly: the same weights, a fresh pool, an empty cache
    finally:
        llm.shutdown()


def test_sizes_the_model_cannot_split_fail_before_any_process_starts():
    with pytest.raises(ValueError, match="query heads: 4 heads are not divisible by the tensor-parallel size 3"):
        LLM("tiny-llama", tensor_parallel_size=3, device="cpu")
