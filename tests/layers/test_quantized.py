"""Quantized linears against float references: each kernel against the dequantized weight it stands for
(tight: only bfloat16 activations and accumulation order differ), and against the original float weight
within the quantization's own error (the tolerances docs/quantization.md documents)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlserve.layers.quantized import (
    MANY_ROWS,
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    QuantizedWeight,
    check_int4_shape,
    fp8_quantize_rows,
    int4_dequantize,
    int4_quantize,
)
from rlserve.models.quantize import fuse


def weights(n: int, k: int, seed: int = 0, rows: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen) * 0.1
    x = torch.randn(rows, k, generator=gen)
    return w, b, x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("make,kernel_tol,float_tol", [
    (lambda w, b: Int8Linear(w, b), 0.01, 0.02),
    (lambda w, b: Int4Linear(w, b, 64), 0.01, 0.15),
    (lambda w, b: Int4Linear(w, b, 32), 0.01, 0.12),
])
def test_cpu_quantized_linear_matches_references(make, kernel_tol, float_tol):
    w, b, x = weights(192, 256)
    layer = make(w, b)
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (5, 192)
    assert rel_err(out, layer.reference(x)) < kernel_tol          # the kernel does what its weight says
    assert rel_err(out, F.linear(x, w, b)) < float_tol            # and that weight is close to the float one
    assert rel_err(out, F.linear(x, w, b)) > 1e-4                 # (it is quantized: not the float path)
    assert layer(x.view(5, 1, 256)).shape == (5, 1, 192)          # any leading dims


def test_int4_dequantized_weight_is_torchaos_reference():
    w, _, _ = weights(64, 128)
    layer = Int4Linear(w, None, 32)
    q, sz = int4_quantize(w, 32)
    assert q.min() >= 0 and q.max() <= 15
    ref = int4_dequantize(q, sz, 32)
    assert torch.allclose(layer.dequantized().float(), ref, atol=2e-3, rtol=1e-2)
    assert rel_err(ref, w) < 0.12


def test_int8_is_symmetric_per_channel():
    w, _, _ = weights(32, 64)
    layer = Int8Linear(w, None)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() == 127
    # each row's largest weight is represented (nearly) exactly
    err = (layer.dequantized() - w).abs().amax(1) / w.abs().amax(1)
    assert err.max() < 0.01


@pytest.mark.parametrize("make", [lambda w, b: Int8Linear(w, b), lambda w, b: Int4Linear(w, b, 64)])
def test_fused_layers_share_storage_and_updates_reach_both(make):
    ws = [weights(n, 128, seed=i)[0] for i, n in enumerate((128, 64, 64))]
    layers = [make(w, torch.zeros(w.shape[0])) for w in ws]
    x = weights(8, 128)[2]
    separate = [l(x) for l in layers]
    stacked = fuse(layers)
    for a, b in zip(stacked(x), separate):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip([l(x) for l in layers], separate):         # the layers now read views of the fused buffers
        assert torch.allclose(a, b, atol=1e-5)
    new = weights(64, 128, seed=9)[0]
    QuantizedWeight(layers[1]).copy_(new)                       # an update by name quantizes into the views
    assert rel_err(stacked(x)[1], F.linear(x, new)) < 0.15
    assert torch.allclose(stacked(x)[0], separate[0], atol=1e-5)
    assert torch.allclose(layers[1](x), stacked(x)[1], atol=1e-5)


CPU_LAYERS = [lambda w, b: Int8Linear(w, b), lambda w, b: Int4Linear(w, b, 32)]


@pytest.mark.parametrize("make", CPU_LAYERS)
def test_many_rows_use_the_bf16_gemm_and_agree_with_the_packed_kernel(make):
    """From MANY_ROWS rows on, the layer multiplies by its bf16 dequantized weight. Against the packed
    kernel on the same input it differs only by rounding: both round the input to bf16; the kernel's
    weight is the same bf16 values (int4) or scales them after the dot product (int8), and each rounds
    its output to bf16 (2^-9 relative), so 1% of the output's norm bounds the difference."""
    w, b, _ = weights(192, 256)
    layer = make(w, b)
    x = torch.randn(MANY_ROWS + 3, 256, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    packed = layer.packed_matmul(x) + b
    assert layer._dense is not None                                 # the many-row path ran
    assert not torch.equal(out, packed)                             # (a different computation)
    assert rel_err(out, packed) < 0.01
    assert rel_err(out, layer.reference(x)) < 0.01
    few = x[:MANY_ROWS - 1]
    assert torch.equal(layer(few), layer.packed_matmul(few) + b)   # below the threshold: the kernel itself


@pytest.mark.parametrize("make", CPU_LAYERS)
def test_bf16_copy_follows_weight_updates_also_through_fused_views(make):
    ws = [weights(n, 128, seed=i)[0] for i, n in enumerate((128, 64))]
    layers = [make(w, None) for w in ws]
    stacked = fuse(layers)
    x = torch.randn(MANY_ROWS, 128, generator=torch.Generator().manual_seed(2))
    before = stacked(x)                                             # builds the fused layer's bf16 copy
    assert rel_err(before[1], F.linear(x, ws[1])) < 0.15
    new = weights(64, 128, seed=9)[0]
    QuantizedWeight(layers[1]).copy_(new)                           # written into views of the fused buffers
    after = stacked(x)
    assert rel_err(after[1], F.linear(x, new)) < 0.15               # the copy was rebuilt, not stale
    assert rel_err(after[1], layers[1].packed_matmul(x)) < 0.01
    assert torch.equal(after[0], before[0])


def test_int4_shape_errors_name_the_option():
    with pytest.raises(ValueError, match="quantization_group_size 128 does not divide in_features 576"):
        check_int4_shape(576, 576, 128)
    with pytest.raises(ValueError, match="quantization_group_size must be one of"):
        check_int4_shape(576, 576, 48)
    with pytest.raises(ValueError, match="out_features divisible by 16"):
        Int4Linear(torch.randn(24, 64), None, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_linear_matches_its_reference_and_the_float_layer():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores")
    w, b, x = (t.cuda().bfloat16() for t in weights(256, 512))
    layer = Fp8Linear(w, b)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 256)
    assert rel_err(out, layer.reference(x)) < 0.01
    assert rel_err(out, F.linear(x.float(), w.float(), b.float())) < 0.06
    new = weights(256, 512, seed=3)[0].cuda().bfloat16()
    QuantizedWeight(layer).copy_(new)
    assert rel_err(layer(x), F.linear(x.float(), new.float(), b.float())) < 0.06


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_activation_kernel_equals_the_torch_quantization(dtype):
    """The one-launch Triton quantization gives fp8_quantize_rows' codes and scales bit for bit: rows
    spanning several chunks and a partial one, an all-zero row, tiny and huge magnitudes, strided rows."""
    from rlserve.layers.triton_fp8 import quantize_rows

    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, cols in ((1, 16), (7, 4096), (33, 5000), (256, 14336)):
        x = torch.randn(rows, cols + 8, device="cuda", generator=gen).to(dtype)[:, 4:cols + 4]   # strided
        x[0] *= 1e-3
        x[-1, : cols // 2] *= 1e4
        if rows > 2:
            x[1] = 0
        q, scales = quantize_rows(x)
        ref_q, ref_scales = fp8_quantize_rows(x)
        assert torch.equal(scales, ref_scales)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), (rows, cols)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_tensorwise_path_equals_its_epilogue_arithmetic_and_the_rowwise_gemm(monkeypatch):
    """Few rows through the tensor-wise GEMM (unit scales, float32 sums) and the Triton epilogue: bit for
    bit the torch arithmetic on the same sums, within a bfloat16 step or two of the row-wise GEMM, and the
    layer (fused too) takes that path under no_grad when RLSERVE_FP8_TENSORWISE_ROWS allows it."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores")
    from rlserve.layers import quantized
    from rlserve.layers.triton_fp8 import quantize_rows, scale_rows_cols

    for rows in (1, 7, 64):
        w, b, x = (t.cuda().bfloat16() for t in weights(4096, 1024, rows=rows))
        layer = Fp8Linear(w, b)
        xq, xs = quantize_rows(x)
        acc = torch._scaled_mm(xq, layer.qweight.t(), scale_a=layer.unit_scale, scale_b=layer.unit_scale,
                               out_dtype=torch.float32)
        got = layer.tensorwise_matmul(xq, xs)
        assert torch.equal(got, (acc * xs * layer.weight_scale).to(torch.bfloat16))
        assert torch.equal(scale_rows_cols(acc, xs, layer.weight_scale), got)
        rowwise = torch._scaled_mm(xq, layer.qweight.t(), scale_a=xs, scale_b=layer.weight_scale,
                                   out_dtype=torch.bfloat16)
        assert rel_err(got, rowwise) < 0.01
        monkeypatch.setattr(quantized, "FP8_TENSORWISE_ROWS", 64)
        with torch.no_grad():
            assert torch.equal(layer(x), got + b)
            fused = fuse([Fp8Linear(w, b), Fp8Linear(w, b)]).fused      # carries the unit scale over
            assert torch.equal(fused(x), fused.tensorwise_matmul(xq, xs) + fused.bias)
        monkeypatch.setattr(quantized, "FP8_TENSORWISE_ROWS", 0)
