"""Triton extend attention (prefill chunks): a flash-attention loop per (sequence, query head, block of
new tokens), first over the cached prefix, gathered through req_to_token (an fp8 pool's scales applied
as in decode), then causally over the new tokens themselves.
"""
from __future__ import annotations

import torch

from rlserve.layers.attention.base import ForwardBatch
from rlserve.layers.attention.triton_common import LOG2E, dot_precision, next_pow2, scale_strides
from rlserve.layers.triton_support import jit, tl, triton


@jit
def _extend_tile(q, k, v, k_scale, v_scale, m_i, l_i, acc, qk_scale, visible, DOT_PRECISION: tl.constexpr,
                 MASK: tl.constexpr, SCALED: tl.constexpr):
    """One online-softmax step of extend attention: q [M, D] against k [D, N] (already transposed) and
    v [N, D]; `visible` [M or 1, N] masks scores when MASK; an fp8 tile's per-token scales (k_scale,
    v_scale: [1, N]) apply to a column of q·kᵀ and of the weights when SCALED."""
    qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
    if SCALED:
        qk = qk * k_scale
    if MASK:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if SCALED:
        p = p * v_scale
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@jit
def _extend_kernel(Q, K, V, O, K_buf, V_buf, K_scale, V_scale, ReqToToken, ReqRows, SeqLens, ExtendLens,
                   CuExtend, qk_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                   stride_kbt, stride_kbh, stride_vbt, stride_vbh, stride_ss, stride_sh, stride_req,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   FP8: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    ext_len = tl.load(ExtendLens + b).to(tl.int32)
    if mb * BLOCK_M >= ext_len:
        return
    prefix_len = tl.load(SeqLens + b).to(tl.int32) - ext_len
    first = tl.load(CuExtend + b).to(tl.int64)   # flat index of this sequence's first new token
    row = tl.load(ReqRows + b).to(tl.int64)
    kvh = h // GROUP

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < ext_len
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + (first + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Cached prefix: every new token sees all of it.
    for n0 in range(0, prefix_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < prefix_len
        slots = tl.load(ReqToToken + row * stride_req + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K_buf + slots[None, :] * stride_kbt + kvh * stride_kbh + offs_d[:, None],
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        v = tl.load(V_buf + slots[:, None] * stride_vbt + kvh * stride_vbh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        k_scale = 1.0
        v_scale = 1.0
        if FP8:
            k_scale = tl.load(K_scale + slots * stride_ss + kvh * stride_sh, mask=mask_n, other=0.0)[None, :]
            v_scale = tl.load(V_scale + slots * stride_ss + kvh * stride_sh, mask=mask_n, other=0.0)[None, :]
        m_i, l_i, acc = _extend_tile(q, k, v, k_scale, v_scale, m_i, l_i, acc, qk_scale, mask_n[None, :],
                                     DOT_PRECISION, MASK=True, SCALED=FP8)

    # The new tokens themselves. Blocks wholly below this query block's diagonal need no mask; the
    # diagonal ones are masked causally; nothing past the block's last row is read.
    k_ptrs = K + kvh * stride_kh + offs_d[:, None]
    v_ptrs = V + kvh * stride_vh + offs_d[None, :]
    full_end = tl.minimum(mb * BLOCK_M, ext_len) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if HEAD_DIM == BLOCK_D:   # the common case: no mask at all on these loads
            k = tl.load(k_ptrs + (first + offs_n)[None, :] * stride_kt)
            v = tl.load(v_ptrs + (first + offs_n)[:, None] * stride_vt)
        else:
            k = tl.load(k_ptrs + (first + offs_n)[None, :] * stride_kt, mask=mask_d[:, None], other=0.0)
            v = tl.load(v_ptrs + (first + offs_n)[:, None] * stride_vt, mask=mask_d[None, :], other=0.0)
        m_i, l_i, acc = _extend_tile(q, k, v, 1.0, 1.0, m_i, l_i, acc, qk_scale, True,
                                     DOT_PRECISION, MASK=False, SCALED=False)
    causal_end = tl.minimum(ext_len, (mb + 1) * BLOCK_M)
    for n0 in range(full_end, causal_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < ext_len
        k = tl.load(k_ptrs + (first + offs_n)[None, :] * stride_kt, mask=mask_n[None, :] & mask_d[:, None],
                    other=0.0)
        v = tl.load(v_ptrs + (first + offs_n)[:, None] * stride_vt, mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        visible = mask_n[None, :] & (offs_m[:, None] >= offs_n[None, :])
        m_i, l_i, acc = _extend_tile(q, k, v, 1.0, 1.0, m_i, l_i, acc, qk_scale, visible,
                                     DOT_PRECISION, MASK=True, SCALED=False)

    out = acc / l_i[:, None]
    tl.store(O + (first + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_launch_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the extend kernel. On an H100, graph-timed, 64/32/4/3 is the
    fastest config on prefill chunks like the offline workload's (14 x 585 new tokens 121.8 us, 64 x 300
    224.4 us) and within 4% on 16 x 1,024; 128/32/4/3 wins long prefixes (4 x 2,048 after 2,048: 642
    against 737 us)."""
    small = dtype.itemsize <= 2
    if small and next_pow2(head_dim) <= 128:
        return 64, 32, 4, 3
    if small:
        return 64, 32, 4, 2
    return 32, 32, 4, 1


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor,
                     v_buf: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | tuple[None, None],
                     out: torch.Tensor, batch: ForwardBatch, cu_extend: torch.Tensor, max_extend: int,
                     scale: float) -> None:
    """out = attention of each new token (q [T, H, D]) over its sequence's cached prefix and, causally,
    the new tokens' own k/v; cu_extend [B + 1] holds where each sequence's new tokens start in q."""
    heads, dim = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    block_m, block_n, warps, stages = extend_launch_config(q.dtype, dim)
    table = batch.req_to_token
    grid = (batch.batch_size, heads, triton.cdiv(max_extend, block_m))
    fp8 = scales[0] is not None
    k_scale, v_scale = scales if fp8 else (k_buf, v_buf)
    _extend_kernel[grid](
        q, k, v, out, k_buf, v_buf, k_scale, v_scale, table, batch.req_rows, batch.seq_lens,
        batch.extend_lens, cu_extend, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        *scale_strides(*scales), table.stride(0),
        GROUP=group, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(dim),
        DOT_PRECISION=dot_precision(q.dtype), FP8=fp8, num_warps=warps, num_stages=stages)
