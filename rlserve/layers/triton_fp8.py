"""Per-row FP8 quantization of activations in one Triton launch.

An FP8 layer quantizes its input per token before `torch._scaled_mm`: the row's max |x| maps to e4m3's
largest value, 448. In plain torch that is about eight kernels (a float copy, abs, amax, clamp, the
scale's division, the row's division, clamp, the cast), each reading or writing the activations; in a
decode step of a 32-layer model with four FP8 projections a layer they are ~1,000 launches, which cost
about what FP8 saves in weight reads. Here each row is one program: one pass for its max, one that
writes the codes and the scale. It computes what `quantized.fp8_quantize_rows` computes (the reference
the tests hold it to): the scale as max|x| times 1/448, the division by it rounded to nearest as torch's
is, the cast rounding to nearest even.

`scale_rows_cols` is the epilogue of a tensor-wise scaled GEMM: at decode sizes cuBLASLt's tensor-wise
FP8 GEMM ran 1.2-2x faster on an H100 than the row-wise one (docs/benchmarks.md), so few rows can take
it with unit scales, float32 sums out, and this kernel applies the per-token and per-channel scales and
rounds to bfloat16 once: the arithmetic of the row-wise kernel's own epilogue.
"""
from __future__ import annotations

import torch

from rlserve.layers.triton_support import HAS_TRITON, last_dim_contiguous, tl, triton
from rlserve.layers.triton_support import jit as _jit

# Triton kernels read module globals only as constexpr.
FP8_MAX = tl.constexpr(448.0) if HAS_TRITON else 448.0
INV_FP8_MAX = tl.constexpr(1.0 / 448.0) if HAS_TRITON else 1.0 / 448.0
MIN_AMAX = tl.constexpr(1e-12) if HAS_TRITON else 1e-12
CHUNK = 2048
EPILOGUE_BLOCK = 1024


@_jit
def _quantize_rows_kernel(X, Q, Scale, stride_x, stride_q, cols, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, cols, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        x = tl.load(X + row * stride_x + offs, mask=offs < cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), MIN_AMAX) * INV_FP8_MAX      # as the reference: times 1/448
    tl.store(Scale + row, scale)
    for start in range(0, cols, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < cols
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        q = _round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX))
        tl.store(Q + row * stride_q + offs, q.to(Q.dtype.element_ty), mask=mask)


@_jit
def _round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still as float32: the cast
    that follows is then exact whatever path the backend's float32 -> fp8 conversion takes (one through
    float16 rounds twice; Triton's interpreter mis-rounds where the mantissa carries into the exponent).
    Integer arithmetic only. Normal e4m3 (|v| >= 2^-6) keeps 3 of float32's 23 mantissa bits; below,
    e4m3 is subnormal: multiples of 2^-9."""
    bits = v.to(tl.uint32, bitcast=True)
    kept = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    normal = kept.to(tl.float32, bitcast=True)
    t = tl.abs(v) * 512.0                     # exact (a power of two); below 8 in the subnormal range
    whole = t.to(tl.int32)                    # truncation: floor for t >= 0
    frac = t - whole.to(tl.float32)           # exact: t and its integer part share an exponent range
    up = (frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))
    sub = (whole + up.to(tl.int32)).to(tl.float32) * (1.0 / 512.0)
    # the sign as a bit: -0.0 stays -0.0, as torch casts it (compiled, `-sub` is 0 - sub, which gives +0.0)
    sub = (sub.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) >= 0.015625, normal, sub)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes [rows, cols], float32 scales [rows, 1]) of a [rows, cols] tensor (CUDA; a CPU one
    only under Triton's interpreter)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows wants a [rows, cols] tensor, got {tuple(x.shape)}")
    x = last_dim_contiguous(x)
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](x, q, scales, x.stride(0), q.stride(0), cols, CHUNK=CHUNK, num_warps=4)
    return q, scales


@_jit
def _scale_rows_cols_kernel(Acc, RowScale, ColScale, Out, stride_acc, stride_out, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    acc = tl.load(Acc + row * stride_acc + offs, mask=mask, other=0.0)
    out = acc * tl.load(RowScale + row) * tl.load(ColScale + offs, mask=mask, other=0.0)
    tl.store(Out + row * stride_out + offs, out.to(Out.dtype.element_ty), mask=mask)


def scale_rows_cols(acc: torch.Tensor, row_scales: torch.Tensor, col_scales: torch.Tensor,
                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(acc * row_scales * col_scales) in `out_dtype`, one rounding: acc float32 [rows, cols], row_scales
    float32 [rows, 1], col_scales float32 [1, cols] (each last dim contiguous)."""
    if acc.dim() != 2 or acc.dtype != torch.float32:
        raise ValueError(f"scale_rows_cols wants float32 sums [rows, cols], got {acc.dtype} {tuple(acc.shape)}")
    rows, cols = acc.shape
    if row_scales.numel() != rows or col_scales.numel() != cols:
        raise ValueError(f"scales of {row_scales.numel()} rows and {col_scales.numel()} columns for sums "
                         f"[{rows}, {cols}]")
    acc, row_scales, col_scales = (last_dim_contiguous(t) for t in (acc, row_scales, col_scales))
    out = torch.empty(rows, cols, dtype=out_dtype, device=acc.device)
    if rows and cols:
        grid = (rows, triton.cdiv(cols, EPILOGUE_BLOCK))
        _scale_rows_cols_kernel[grid](acc, row_scales, col_scales, out, acc.stride(0), out.stride(0), cols,
                                      BLOCK=EPILOGUE_BLOCK, num_warps=4)
    return out
