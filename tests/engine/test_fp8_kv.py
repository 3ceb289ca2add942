"""The fp8 (e4m3) KV cache on the torch reference path: quantisation error bounds, the pool's byte
budget, and greedy generations of the real default model staying on the full-precision path."""
from __future__ import annotations

import pytest
import torch

from rlserve import LLM, SamplingParams
from rlserve.kv_pool import FP8_DTYPE, KVPool, quantize_fp8


def test_quantize_fp8_error_is_relative_to_each_head():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, 64, generator=gen)
    x[:, 0] *= 1e-5                         # tiny values keep their precision (own scale)
    x[:, 1] *= 1e4                          # large ones don't saturate
    q, s = quantize_fp8(x)
    assert q.dtype == FP8_DTYPE and s.shape == (32, 4)
    err = ((q.float() * s[..., None]) - x).abs().amax(-1) / x.abs().amax(-1)
    assert err.max().item() <= 1 / 16
    assert (q.float().abs().amax(-1) == 448).all()      # each head's largest value maps to the top


def test_pool_stores_and_loads_dequantised():
    pool = KVPool(1, 10, 2, 8, FP8_DTYPE, "cpu")
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8) * 100
    slots = torch.tensor([4, 1, 7])
    pool.store(0, slots, k, v)
    k2, v2 = pool.load(0, slots, torch.float32)
    assert torch.allclose(k2, k, rtol=0.07, atol=0.07 * k.abs().max().item())
    assert torch.allclose(v2, v, rtol=0.07, atol=0.07 * v.abs().max().item())
    assert KVPool.bytes_per_token(1, 2, 8, FP8_DTYPE) == 2 * 2 * (8 + 4)


def test_pool_scales_are_indexed_by_slot_but_stored_head_major():
    pool = KVPool(2, 10, 3, 8, FP8_DTYPE, "cpu")
    for scales in pool.k_scales + pool.v_scales:
        assert scales.shape == (10, 3) and scales.stride() == (1, 10)   # one head's slots are adjacent
    k = torch.randn(2, 3, 8)
    pool.store(1, torch.tensor([6, 2]), k, k)
    _, expected = quantize_fp8(k)
    assert torch.equal(pool.k_scales[1][torch.tensor([6, 2])], expected)
    assert torch.equal(pool.k_scales[1].t().contiguous()[:, 6], expected[0])   # head-major storage
    assert pool.k_scales[1].count_nonzero() == 6 and pool.k_scales[0].count_nonzero() == 0
    pool.set_resident(False)
    assert pool.k_scales[0].numel() == 0
    pool.set_resident(True)                # back, zeroed, head-major again
    assert pool.k_scales[1].stride() == (1, 10) and pool.k_scales[1].count_nonzero() == 0


def test_fp8_pool_holds_more_tokens_in_the_same_bytes(default_model_dir):
    a = LLM(str(default_model_dir), kv_cache_bytes=64 << 20)
    b = LLM(str(default_model_dir), kv_cache_bytes=64 << 20, kv_cache_dtype="fp8_e4m3")
    ratio = b.engine.status().kv_total / a.engine.status().kv_total
    assert 3.5 < ratio < 4.0          # fp32 model: 4 bytes → 1 byte + a 4-byte scale per 64-dim head


def test_fp8_greedy_generations_follow_full_precision(default_model_dir):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=24)
    ref = LLM(str(default_model_dir), max_total_tokens=4096).generate(prompts, params, use_tqdm=False)
    llm = LLM(str(default_model_dir), max_total_tokens=4096, kv_cache_dtype="fp8_e4m3")
    got = llm.generate(prompts, params, use_tqdm=False)
    same = sum(r.outputs[0].token_ids == g.outputs[0].token_ids for r, g in zip(ref, got))
    assert same >= 3, [(r.outputs[0].text, g.outputs[0].text) for r, g in zip(ref, got)]
    assert llm.engine.kv_leaked() == 0


def test_unknown_kv_dtype_is_a_clear_error(default_model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(default_model_dir), kv_cache_dtype="int3")
