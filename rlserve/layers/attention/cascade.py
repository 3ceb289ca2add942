"""Cascade attention for decode: a prefix shared by several requests is read once per step for all
of them, not once per request.

When many requests continue the same long cached prefix (a system prompt, a few-shot block, a document
asked several questions, the n samples of one prompt), plain decode attention streams that prefix's
K/V from HBM once per request. Here one program per (group, kv head, span of the prefix) loads each
block of the prefix once and multiplies it with the queries of every member at once — members × query
heads per kv head form the rows of one dot. It writes a partial result (output and log-sum-exp) per
member and head into spare span slots of the split-K decode scratch; the decode kernel covers each
request's own tokens after the prefix, and the usual merge combines both, exactly as it combines
split-K spans.
"""
from __future__ import annotations

import torch

from rlserve.layers.attention.base import SharedPrefixes
from rlserve.layers.attention.triton_common import attend_span, dot_precision, next_pow2, scale_strides
from rlserve.layers.triton_support import jit, tl

# Spans per shared prefix. Fixed, so that the kernels' compile-time shapes never change from step to
# step (each new combination would compile anew) and a CUDA graph captured for a batch size serves
# every grouping; each span's length follows the prefix's length on the device.
CASCADE_PREFIX_SPLITS = 4


@jit
def _shared_prefix_kernel(Q, K_buf, V_buf, K_scale, V_scale, ReqToToken, Members, Lengths, Rows, MidO, MidLse,
                          qk_scale,
                          stride_qb, stride_qh, stride_kbt, stride_kbh, stride_vbt, stride_vbh, stride_ss,
                          stride_sh, stride_req, stride_mem, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                          GROUP: tl.constexpr, MAX_MEMBERS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          PREFIX_SPLITS: tl.constexpr, FIRST_SLOT: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(Lengths + g).to(tl.int32)
    span = (length + PREFIX_SPLITS - 1) // PREFIX_SPLITS
    span = (span + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * span
    if start >= length:
        return   # its slot keeps the -inf the merge skips
    end = tl.minimum(start + span, length)

    # Row r of the dot is query head (r % GROUP) of kv head kvh for member (r // GROUP).
    offs_m = tl.arange(0, BLOCK_M)
    member = offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    b = tl.load(Members + g * stride_mem + member, mask=member < MAX_MEMBERS, other=-1)
    valid = b >= 0
    b = tl.where(valid, b, 0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=valid[:, None] & mask_d[None, :], other=0.0)
    if FP8:   # as in the decode kernel: dots in fp16, which e4m3 converts to in one instruction
        q = q.to(tl.float16)
    row = tl.load(Rows + g).to(tl.int64)

    m_i, l_i, acc = attend_span(q, K_buf, V_buf, K_scale, V_scale, ReqToToken, row, start, end, kvh, qk_scale,
                                 stride_kbt, stride_kbh, stride_vbt, stride_vbh, stride_ss, stride_sh, stride_req,
                                 BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, FP8)

    out = acc / l_i[:, None]
    slot = FIRST_SLOT + split
    tl.store(MidO + b[:, None] * stride_mb + heads[:, None] * stride_mh + slot * stride_ms + offs_d[None, :],
             out, mask=valid[:, None] & mask_d[None, :])
    tl.store(MidLse + b * stride_lb + heads * stride_lh + slot, m_i + tl.log2(l_i), mask=valid)


def shared_prefix_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                            k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, table: torch.Tensor,
                            shared: SharedPrefixes, mid_o: torch.Tensor, mid_lse: torch.Tensor, first_slot: int,
                            prefix_splits: int, qk_scale: float) -> None:
    """Partial attention of every member's query over its group's shared prefix, into span slots
    [first_slot, first_slot + prefix_splits) of the decode scratch (mid_o [B, H, S, D], mid_lse [B, H, S])."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_buf.shape[1]
    group = heads // kv_heads
    fp8 = k_scale is not None
    block_d = next_pow2(dim)
    block_m = max(16, next_pow2(shared.max_members * group))
    block_n = 64 if block_d <= 128 and q.element_size() <= 2 else 32
    ks, vs = (k_scale, v_scale) if fp8 else (k_buf, v_buf)
    _shared_prefix_kernel[(shared.num_groups, kv_heads, prefix_splits)](
        q, k_buf, v_buf, ks, vs, table, shared.members, shared.lengths, shared.rows, mid_o, mid_lse, qk_scale,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        *scale_strides(k_scale, v_scale), table.stride(0), shared.members.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, MAX_MEMBERS=shared.max_members, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_D=block_d,
        BLOCK_N=block_n, PREFIX_SPLITS=prefix_splits, FIRST_SLOT=first_slot,
        DOT_PRECISION=dot_precision(q.dtype), FP8=fp8, num_warps=4, num_stages=2)
