"""Triton kernels for the elementwise steps of a layer: the gated activation, rotary (with Qwen3's
per-head q/k norm before it), and RMSNorm (with the residual add before it).

Inductor compiles these with dynamic shapes. On a prefill step of 8,192 tokens with qwen3-0.6b, its
q/k-norm-plus-rotary kernels streamed ~0.85 TB/s and its SiLU-and-mul ~1.8 TB/s, on an H200 that
copies at ~4 TB/s; together they took 102 ms of a 378 ms prefill. Its RMSNorm reaches ~4 TB/s, but
every call of a compiled region also costs the host dynamo's guards and wrappers: 112 calls a prefill
step. Here each step is one plain Triton launch:
- rotary: one program per token, covering its every q and k head;
- the activation: one program per block of one token's columns, reading the halves of a stacked
  projection in place;
- RMSNorm: one program per row.

The engine uses them on CUDA by default (compile="auto" or "triton"; `--elementwise inductor` keeps
torch.compile's): on an H100 the offline benchmark runs 2-3% faster with them. All compute in float32
and round once, keeping the casts the eager versions in fused.py make on purpose: the normalised row is
rounded to the model dtype before the norm weight, the residual sum before it is normalised, and cos/sin
before rotary (tests/layers/test_triton_elementwise.py).
"""
from __future__ import annotations

import torch

from rlserve.layers.triton_support import HAS_TRITON as HAS_TRITON  # fused.py asks this module
from rlserve.layers.triton_support import jit as _jit
from rlserve.layers.triton_support import last_dim_contiguous, tl, triton


@_jit
def _silu_mul_kernel(Gate, Up, Out, stride_g, stride_u, stride_o, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    g = tl.load(Gate + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(Out + row * stride_o + offs, out.to(Out.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [T, I] inputs (rows may be strided, as halves of one projection are)."""
    if gate.shape != up.shape or gate.dim() != 2:
        raise ValueError(f"silu_mul wants two [T, I] tensors of one shape, got {tuple(gate.shape)} and "
                         f"{tuple(up.shape)}")
    gate, up = last_dim_contiguous(gate), last_dim_contiguous(up)
    t, cols = gate.shape
    out = torch.empty(t, cols, dtype=gate.dtype, device=gate.device)
    if t == 0:
        return out
    block = min(1024, triton.next_power_of_2(cols))
    _silu_mul_kernel[(t, triton.cdiv(cols, block))](gate, up, out, gate.stride(0), up.stride(0), out.stride(0),
                                                   cols, BLOCK=block, num_warps=4)
    return out


@_jit
def _rms_norm_kernel(X, Delta, W, Out, Summed, stride_x, stride_d, stride_o, stride_s, cols, eps,
                     BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:   # the residual sum, rounded to the model dtype as the eager add leaves it
        x = x + tl.load(Delta + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(Summed.dtype.element_ty)
        tl.store(Summed + row * stride_s + offs, x, mask=mask)
        x = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / cols + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    y = (x * inv).to(Out.dtype.element_ty).to(tl.float32) * w
    tl.store(Out + row * stride_o + offs, y.to(Out.dtype.element_ty), mask=mask)


MAX_NORM_DIM = 32768   # one program holds a whole row


def norm_supported(x: torch.Tensor, weight: torch.Tensor, *_) -> bool:
    """Whether the RMSNorm kernel serves these: rows it can hold, and a weight of x's dtype (the eager
    version would promote the output to a wider weight's dtype)."""
    return 0 < x.shape[-1] <= MAX_NORM_DIM and weight.dtype == x.dtype


def add_norm_supported(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, *_) -> bool:
    return delta.dtype == x.dtype and norm_supported(x, weight)


def silu_mul_supported(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.dtype == up.dtype


def _norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    cols = x.shape[-1]
    if not 0 < cols <= MAX_NORM_DIM or weight.shape != (cols,) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"rms_norm wants rows of at most {MAX_NORM_DIM} entries, a weight of the row's "
                         f"length and a delta of x's shape; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
                         + ("" if delta is None else f", delta {tuple(delta.shape)}"))
    rows = last_dim_contiguous(x).reshape(-1, cols)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    summed = None if delta is None else torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    d = rows if delta is None else last_dim_contiguous(delta).reshape(-1, cols)
    if rows.shape[0]:
        block = triton.next_power_of_2(cols)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, d, weight, out, out if summed is None else summed, rows.stride(0), d.stride(0), out.stride(0),
            out.stride(0), cols, eps, BLOCK=block, ADD=delta is not None, num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape), None if summed is None else summed.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fused.rms_norm over the last dim, one program a row."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """fused.add_rms_norm: (rms_norm(x + delta), x + delta) in one pass."""
    out, summed = _norm(x, delta, weight, eps)
    assert summed is not None     # a delta always gives the sum
    return out, summed


@_jit
def _rotate_heads(X, Out, W, cos1, sin1, cos2, sin2, row, stride_xt, stride_xh, stride_ot, stride_oh, eps,
                  HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr):
    """One token's HEADS heads of X: optional RMSNorm over head_dim, then rotate-half rotary."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    mask = (offs_h < HEADS)[:, None]
    base = X + row * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:   # rms_norm: normalise in float32, round to the model dtype, then scale by the weight
        inv = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(W + offs_d).to(tl.float32)[None, :]
        w2 = tl.load(W + HALF + offs_d).to(tl.float32)[None, :]
        x1 = (x1 * inv).to(Out.dtype.element_ty).to(tl.float32) * w1
        x2 = (x2 * inv).to(Out.dtype.element_ty).to(tl.float32) * w2
    out = Out + row * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(out, (x1 * cos1 - x2 * sin1).to(Out.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * cos2 + x1 * sin2).to(Out.dtype.element_ty), mask=mask)


@_jit
def _rotary_kernel(Q, K, QOut, KOut, QW, KW, Cos, Sin,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                   stride_ct, stride_st, eps,
                   Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                   HALF: tl.constexpr, NORM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    dtype = QOut.dtype.element_ty
    # apply_rotary rounds cos/sin to the model dtype before using them.
    cos1 = tl.load(Cos + row * stride_ct + offs_d).to(dtype).to(tl.float32)[None, :]
    sin1 = tl.load(Sin + row * stride_st + offs_d).to(dtype).to(tl.float32)[None, :]
    cos2 = tl.load(Cos + row * stride_ct + HALF + offs_d).to(dtype).to(tl.float32)[None, :]
    sin2 = tl.load(Sin + row * stride_st + HALF + offs_d).to(dtype).to(tl.float32)[None, :]
    _rotate_heads(Q, QOut, QW, cos1, sin1, cos2, sin2, row, stride_qt, stride_qh, stride_qot, stride_qoh, eps,
                  Q_HEADS, BLOCK_QH, HALF, NORM)
    _rotate_heads(K, KOut, KW, cos1, sin1, cos2, sin2, row, stride_kt, stride_kh, stride_kot, stride_koh, eps,
                  K_HEADS, BLOCK_KH, HALF, NORM)


def rotary_supported(q: torch.Tensor, k: torch.Tensor, *_) -> bool:
    """Whether the rotary kernel serves this head_dim (a power of two: the halves are tl.arange spans)
    and q and k share a dtype."""
    dim = q.shape[-1]
    return dim >= 2 and dim & (dim - 1) == 0 and k.dtype == q.dtype


def qk_norm_rotary_supported(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                             *_) -> bool:
    """rotary_supported, and norm weights of q's dtype (as for norm_supported)."""
    return rotary_supported(q, k) and q_weight.dtype == k_weight.dtype == q.dtype


def _rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
            eps: float, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, q_heads, dim = q.shape
    if (k.dim() != 3 or k.shape[0] != t or k.shape[2] != dim or not rotary_supported(q, k)
            or cos.shape != (t, dim) or sin.shape != (t, dim)):
        raise ValueError(f"rotary wants q [T, Hq, D] and k [T, Hk, D] with D a power of two, and cos/sin "
                         f"[T, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)}")
    q, k, cos, sin = (last_dim_contiguous(x) for x in (q, k, cos, sin))
    k_heads = k.shape[1]
    q_out = torch.empty(t, q_heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, k_heads, dim, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    norm = q_weight is not None
    _rotary_kernel[(t,)](
        q, k, q_out, k_out, q_weight if norm else q, k_weight if norm else k, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
        k_out.stride(0), k_out.stride(1), cos.stride(0), sin.stride(0), eps,
        Q_HEADS=q_heads, K_HEADS=k_heads, BLOCK_QH=triton.next_power_of_2(q_heads),
        BLOCK_KH=triton.next_power_of_2(k_heads), HALF=dim // 2, NORM=norm, num_warps=4)
    return q_out, k_out


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """fused.apply_rotary in one launch: q [T, Hq, D], k [T, Hk, D], cos/sin [T, D]."""
    return _rotary(q, k, None, None, 0.0, cos, sin)


def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fused.qk_norm_rotary in one launch."""
    return _rotary(q, k, q_weight, k_weight, eps, cos, sin)
