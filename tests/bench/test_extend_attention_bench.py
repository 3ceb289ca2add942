"""The extend-attention benchmark's shapes, flop count and batch layout (the timing itself needs a GPU)."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from benchmarks.extend_attention import ExtendShape, causal_pairs, extend_batch, extend_flops, launch_configs
from rlserve.layers.attention.torch_backend import TorchAttentionBackend


def test_shapes_parse_and_bad_ones_are_refused():
    assert ExtendShape.parse("16x1024") == ExtendShape(16, 1024, 0)
    assert ExtendShape.parse("4X2048+512") == ExtendShape(4, 2048, 512)
    assert str(ExtendShape(4, 2048, 512)) == "4x2048+512"
    for bad in ("16", "x3", "0x10", "2x0", "2x3+-1", "2x3+a"):
        with pytest.raises(argparse.ArgumentTypeError):
            ExtendShape.parse(bad)


@pytest.mark.parametrize("shape", [ExtendShape(3, 5, 0), ExtendShape(2, 4, 7), ExtendShape(1, 1, 0)])
def test_causal_pairs_count_the_mask(shape):
    seen = torch.arange(shape.prefix + shape.new)[None, :] <= (torch.arange(shape.new) + shape.prefix)[:, None]
    assert causal_pairs(shape) == shape.sequences * int(seen.sum())
    assert extend_flops(shape, heads=3, head_dim=8) == 4 * 3 * 8 * causal_pairs(shape)


def test_launch_configs_are_distinct_and_float32_tiles_small():
    for dtype in (torch.bfloat16, torch.float32):
        configs = launch_configs(dtype)
        assert len(configs) == len(set(configs)) > 1
    assert all(m <= 32 and n <= 32 for m, n, _, _ in launch_configs(torch.float32))


@pytest.mark.parametrize("prefix", [0, 6])
def test_extend_batch_layout_matches_plain_attention_over_prefix_and_new_tokens(prefix):
    torch.manual_seed(0)
    shape, heads, kv_heads, dim = ExtendShape(3, 5, prefix), 4, 2, 8
    pool, batch = extend_batch(shape, kv_heads, dim, torch.float32, device="cpu")
    q = torch.randn(shape.sequences * shape.new, heads, dim)
    k = torch.randn(shape.sequences * shape.new, kv_heads, dim)
    v = torch.randn_like(k)
    cached_k, cached_v = pool.k_buffers[0].clone(), pool.v_buffers[0].clone()
    backend = TorchAttentionBackend(pool, dim ** -0.5)
    backend.prepare(batch)
    got = backend.forward(q, k, v, 0, batch).view(shape.sequences, shape.new, heads, dim)
    length = prefix + shape.new
    for b in range(shape.sequences):
        slots = torch.arange(length) + 1 + b * length          # consecutive, after the reserved slot 0
        keys = torch.cat([cached_k[slots[:prefix]], k[b * shape.new:(b + 1) * shape.new]])
        values = torch.cat([cached_v[slots[:prefix]], v[b * shape.new:(b + 1) * shape.new]])
        mask = torch.arange(length)[None, :] <= (torch.arange(shape.new) + prefix)[:, None]
        want = F.scaled_dot_product_attention(q[b * shape.new:(b + 1) * shape.new].transpose(0, 1),
                                              keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
                                              scale=dim ** -0.5, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(got[b], want)
        assert torch.equal(pool.k_buffers[0][slots[prefix:]], k[b * shape.new:(b + 1) * shape.new])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [(128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 1)])
def test_extend_launch_override_matches_the_reference(config, monkeypatch):
    """A sweep's launch config (set over the kernel's own choice, as the benchmark does) still computes
    the reference's attention."""
    from rlserve.layers.attention import triton_extend
    from rlserve.layers.attention.triton_backend import TritonAttentionBackend
    monkeypatch.setattr(triton_extend, "extend_launch_config", lambda *_: config)
    shape = ExtendShape(3, 300, 200)
    pool, batch = extend_batch(shape, 8, 128, torch.bfloat16)
    q = torch.randn(shape.sequences * shape.new, 16, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(shape.sequences * shape.new, 8, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    ref = TorchAttentionBackend(pool, 128 ** -0.5)
    ref.prepare(batch)
    want = ref.forward(q, k, v, 0, batch)
    tri = TritonAttentionBackend(pool, 128 ** -0.5)
    tri.prepare(batch)
    torch.testing.assert_close(tri.forward(q, k, v, 0, batch), want, atol=2e-2, rtol=2e-2)
