"""Per-row FP8 quantization of activations in one Triton launch.

An FP8 layer quantizes its input per token before `torch._scaled_mm`: the row's max |x| maps to e4m3's
largest value, 448. In plain torch that is about eight kernels (a float copy, abs, amax, clamp, the
scale's division, the row's division, clamp, the cast), each reading or writing the activations; in a
decode step of a 32-layer model with four FP8 projections a layer they are ~1,000 launches, which cost
about what FP8 saves in weight reads. Here each row is one program: one pass for its max, one that
writes the codes and the scale. It computes what `quantized.fp8_quantize_rows` computes (the reference
the tests hold it to): divisions rounded to nearest as torch's are, the cast rounding to nearest even.
"""
from __future__ import annotations

import torch

from rlserve.layers.triton_support import jit as _jit
from rlserve.layers.triton_support import last_dim_contiguous, tl

FP8_MAX = tl.constexpr(448.0)
MIN_AMAX = tl.constexpr(1e-12)
CHUNK = 2048


@_jit
def _quantize_rows_kernel(X, Q, Scale, stride_x, stride_q, cols, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, cols, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        x = tl.load(X + row * stride_x + offs, mask=offs < cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), MIN_AMAX), FP8_MAX)
    tl.store(Scale + row, scale)
    for start in range(0, cols, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < cols
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
        tl.store(Q + row * stride_q + offs, q.to(Q.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


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
