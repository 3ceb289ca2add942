"""What the Triton attention kernels share: the online-softmax loop over a span of one sequence's
cached K/V (decode and cascade run it), and the small host-side helpers of their launches.

An fp8 (e4m3) pool stores a float32 scale per (slot, kv head). The kernels load the 1-byte values,
run the dots in the query's dtype (fp16 in decode, where the hardware converts e4m3 in one instruction)
and apply the scales after them — a column of q·kᵀ for K, a column of the softmax weights for V — so
dequantising costs one extra 4-byte load per token and head.
"""
from __future__ import annotations

import torch

# CPU-only installs still import this module; the backend refuses to build without Triton.
from rlserve.layers.triton_support import HAS_TRITON, jit, tl

LOG2E = 1.4426950408889634
# Base-2 exponent by which a row's running max may lag its true max before the accumulator is rescaled.
RESCALE_SLACK = tl.constexpr(8.0) if HAS_TRITON else 8.0


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def scale_strides(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple[int, int]:
    """(slot stride, head stride) of an fp8 pool's [slot, kv head] scales, K's and V's alike; (0, 0)
    for a pool without scales."""
    if k_scale is None or v_scale is None:
        return 0, 0
    if k_scale.stride() != v_scale.stride():
        raise ValueError(f"K and V scales must share strides, got {k_scale.stride()} and {v_scale.stride()}")
    return k_scale.stride(0), k_scale.stride(1)


def dot_precision(dtype: torch.dtype) -> str:
    # Triton's default for float32 dots is tf32 (about 3e-4 relative error); float32 asks for exact.
    return "ieee" if dtype == torch.float32 else "tf32"


@jit
def attend_span(q, K_buf, V_buf, K_scale, V_scale, ReqToToken, row, start, end, kvh, qk_scale,
                stride_kbt, stride_kbh, stride_vbt, stride_vbh, stride_ss, stride_sh, stride_req,
                ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    """Online softmax of q's ROWS query rows over positions [start, end) of table row `row`, kv head
    kvh. Returns (running max, running sum, unnormalised output), all float32, base-2 exponents.

    The running max moves only when some row's tile max exceeds it by more than RESCALE_SLACK (base 2),
    so most tiles skip rescaling the accumulator; weights then reach at most 2^RESCALE_SLACK, which
    16-bit dot inputs hold without loss of relative precision."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    k_scales = K_scale + kvh * stride_sh
    v_scales = V_scale + kvh * stride_sh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(ReqToToken + row * stride_req + offs_n, mask=mask_n, other=0).to(tl.int64)
        # Rows of K are contiguous in the pool: load [N, D] (coalesced) and transpose in registers.
        k = tl.load(K_buf + slots[:, None] * stride_kbt + kvh * stride_kbh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)          # [N, D]
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
        if FP8:   # dequantise after the dot: a per-token scale multiplies a column of qk
            qk = qk * tl.load(k_scales + slots * stride_ss, mask=mask_n, other=0.0)[None, :]
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_tile = tl.max(qk, 1)
        if tl.max(m_tile - m_i, 0) > RESCALE_SLACK:
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.exp2(qk - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        v = tl.load(V_buf + slots[:, None] * stride_vbt + kvh * stride_vbh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)          # [N, D]
        pv = p
        if FP8:   # p·(s ⊙ v) = (p ⊙ s)·v: fold V's per-token scales into the weights
            pv = p * tl.load(v_scales + slots * stride_ss, mask=mask_n, other=0.0)[None, :]
        acc = tl.dot(pv.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
    return m_i, l_i, acc
