"""The short ways a batch-1 CPU decode step takes, each against the long way it replaces: the float32
RMSNorm in one aten call, rotary without dtype casts, SDPA without a mask where every key is valid, and
the pool's K/V writes by index_copy_."""
from __future__ import annotations

import pytest
import torch

from rlserve.kv_pool import KVPool
from rlserve.layers.attention.torch_backend import TorchAttentionBackend
from rlserve.layers.fused import (
    add_rms_norm,
    apply_rotary,
    apply_rotary_rolled,
    qk_norm_rotary,
    qk_norm_rotary_rolled,
    rms_norm,
)
from tests.layers.test_torch_attention import DIM, HEADS, make_case, reference


def rms_norm_op_by_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("rows", [1, 7])
def test_float32_rms_norm_is_bitwise_the_op_by_op_chain(rows):
    gen = torch.Generator().manual_seed(rows)
    x, delta = (torch.randn(rows, 576, generator=gen) * 3 for _ in range(2))
    weight = torch.randn(576, generator=gen)
    assert torch.equal(rms_norm(x, weight, 1e-5), rms_norm_op_by_op(x, weight, 1e-5))
    normed, summed = add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(summed, x + delta) and torch.equal(normed, rms_norm_op_by_op(x + delta, weight, 1e-5))


def test_bfloat16_rms_norm_rounds_before_the_weight():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen).bfloat16()
    weight = torch.randn(64, generator=gen).bfloat16()
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.bfloat16 and torch.equal(out, rms_norm_op_by_op(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_rotate_half(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 16, generator=gen).to(dtype), torch.randn(2, 2, 16, generator=gen).to(dtype)
    angles = torch.rand(2, 16, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    q_out, k_out = apply_rotary(q, k, cos, sin)
    c, s = cos[:, None].to(dtype), sin[:, None].to(dtype)
    for x, out in ((q, q_out), (k, k_out)):
        rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
        assert out.dtype == dtype and torch.equal(out, x * c + rotated * s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolled_rotary_is_bitwise_apply_rotary_across_passes_and_dtypes(dtype):
    """The eager set's rotary equals apply_rotary bit for bit for every layer of a pass (its tables are
    cached by the sin tensor), for a new pass with new tables, and for q of another dtype on the same
    tables; Qwen3's q/k norm + rotary likewise."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):                                   # two forward passes: fresh cos/sin tensors
        angles = torch.rand(3, 64, generator=gen) * 50
        cos, sin = angles.cos(), angles.sin()
        for _layer in range(3):
            q = torch.randn(3, 9, 64, generator=gen).to(dtype)
            k = torch.randn(3, 3, 64, generator=gen).to(dtype)
            for got, want in zip(apply_rotary_rolled(q, k, cos, sin), apply_rotary(q, k, cos, sin)):
                assert got.dtype == dtype and torch.equal(got, want)
            wq, wk = torch.randn(64, generator=gen).to(dtype), torch.randn(64, generator=gen).to(dtype)
            for got, want in zip(qk_norm_rotary_rolled(q, k, wq, wk, 1e-6, cos, sin),
                                 qk_norm_rotary(q, k, wq, wk, 1e-6, cos, sin)):
                assert torch.equal(got, want)
        other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
        q, k = torch.randn(3, 9, 64, generator=gen).to(other), torch.randn(3, 3, 64, generator=gen).to(other)
        for got, want in zip(apply_rotary_rolled(q, k, cos, sin), apply_rotary(q, k, cos, sin)):
            assert got.dtype == other and torch.equal(got, want)


@pytest.mark.parametrize("prefix_lens", [[37], [12, 12, 12]])
def test_decode_where_every_key_is_valid_runs_unmasked(prefix_lens):
    pool, batch, table, (q, k, v) = make_case(prefix_lens, [1] * len(prefix_lens), seed=3)
    expected = reference(pool, batch, table, q, k, v)
    backend = TorchAttentionBackend(pool, DIM ** -0.5)
    backend.prepare(batch)
    assert [mask for _, _, mask in backend._groups] == [None]
    out = backend.forward(q, k, v, 0, batch)
    assert out.shape == (len(prefix_lens), HEADS * DIM)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pool_store_writes_the_slots_in_the_pool_dtype():
    pool = KVPool(2, 10, 2, 4, torch.float32, "cpu")
    slots = torch.tensor([7, 2, 5])
    k = torch.randn(3, 2, 4).bfloat16()
    v = torch.randn(3, 2, 8)[..., ::2]                     # a strided source, as a column slice is
    pool.store(1, slots, k, v)
    assert torch.equal(pool.k_buffers[1][slots], k.float()) and torch.equal(pool.v_buffers[1][slots], v)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[slots] = False
    assert not pool.k_buffers[1][untouched].any() and not pool.k_buffers[0].any()


@pytest.mark.parametrize("layout,runs", [
    ("one run", [(3, 24)]),
    ("prefix elsewhere", [(20, 28), (3, 16)]),        # a cached prefix, then the request's own slots
    ("scattered", None),
])
def test_lone_sequence_in_few_slot_runs_reads_slices_of_the_pool(layout, runs):
    pool, batch, table, (q, k, v) = make_case([20], [1], seed=4)
    if runs is not None:
        table[1, :21] = torch.cat([torch.arange(first, end) for first, end in runs])
        batch.out_cache_loc = table[1, 20:21].clone()
    expected = reference(pool, batch, table, q, k, v)
    backend = TorchAttentionBackend(pool, DIM ** -0.5)
    backend.prepare(batch)
    assert backend._runs == runs
    torch.testing.assert_close(backend.forward(q, k, v, 0, batch), expected, atol=1e-5, rtol=1e-5)
