"""Triton decode attention: split-K over each sequence's context, all query heads of a kv group in one
program.

Decode (one new token per sequence) is memory-bound: each program reads one span of one sequence's
K/V for one kv head and serves every query head of that group, so K/V cross HBM once. Long contexts
are cut into several spans (flash-decoding) whose partial results a second kernel merges. The grid
depends only on the batch size; the per-sequence span count is worked out on the device from
seq_lens, so a decode step never syncs with the host and can be captured in a CUDA graph. With
shared prefixes (cascade.py) the merge also folds in the spans the shared-prefix kernel wrote.
"""
from __future__ import annotations

import math

import torch

from rlserve.layers.attention.base import ForwardBatch, SharedPrefixes
from rlserve.layers.attention.triton_common import LOG2E, attend_span, dot_precision, next_pow2, scale_strides
from rlserve.layers.triton_support import jit, tl

MAX_KV_SPLITS = 16        # upper bound on spans per (sequence, kv head)
DEFAULT_KV_SPLITS = 8     # the bound used once the batch alone fills the GPU
MIN_SPLIT_TOKENS = 256    # a sequence is cut into spans of at least this many tokens


@jit
def _split_plan(seq_len, MAX_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """How many spans a sequence gets and how long each is (a multiple of BLOCK_N)."""
    n_splits = tl.minimum((seq_len + MIN_SPLIT - 1) // MIN_SPLIT, MAX_SPLITS)
    per_split = (seq_len + tl.maximum(n_splits, 1) - 1) // tl.maximum(n_splits, 1)
    split_len = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    return n_splits, split_len


@jit
def _decode_split_kernel(Q, K_buf, V_buf, K_scale, V_scale, ReqToToken, ReqRows, SeqLens, Starts, MidO, MidLse,
                         O, qk_scale,
                         stride_qb, stride_qh, stride_kbt, stride_kbh, stride_vbt, stride_vbh, stride_ss,
                         stride_sh, stride_req, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                         stride_ob, stride_oh,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr,
                         MIN_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
                         HAS_START: tl.constexpr, DIRECT: tl.constexpr):
    # kv heads vary fastest in launch order: the programs resident together read neighbouring bytes (a
    # token's heads lie side by side in the pool), 4-6% faster on an fp8 pool than batch rows first.
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    first = 0
    if HAS_START:   # cascade: positions [0, Starts[b]) were attended by the shared-prefix kernel
        first = tl.load(Starts + b).to(tl.int32)
    n_splits, split_len = _split_plan(seq_len - first, MAX_SPLITS, MIN_SPLIT, BLOCK_N)
    start = first + split * split_len
    if (split >= n_splits) | (start >= seq_len):
        return   # the merge kernel skips this span by the same arithmetic
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + offs_g
    mask_h = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    if FP8:   # e4m3 → fp16 is one instruction (→ bf16 is several); fp16 also holds every e4m3 value
        q = q.to(tl.float16)
    row = tl.load(ReqRows + b).to(tl.int64)

    m_i, l_i, acc = attend_span(q, K_buf, V_buf, K_scale, V_scale, ReqToToken, row, start, end, kvh, qk_scale,
                                 stride_kbt, stride_kbh, stride_vbt, stride_vbh, stride_ss, stride_sh, stride_req,
                                 BLOCK_H, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, FP8)

    out = acc / l_i[:, None]
    mask_out = mask_h[:, None] & mask_d[None, :]
    if DIRECT:   # one span and no shared-prefix part: this is the answer, no merge needed
        tl.store(O + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=mask_out)
    else:
        tl.store(MidO + b.to(tl.int64) * stride_mb + heads[:, None] * stride_mh + split * stride_ms
                 + offs_d[None, :], out, mask=mask_out)
        tl.store(MidLse + b.to(tl.int64) * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i),
                 mask=mask_h)


@jit
def _decode_merge_kernel(MidO, MidLse, SeqLens, O,
                         stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr,
                         TOTAL_SLOTS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    base = b.to(tl.int64) * stride_lb + h * stride_lh
    if TOTAL_SLOTS > 0:
        # Cascade: spans come from two kernels; every slot was preset to -inf and only written ones
        # hold a finite lse.
        lse = tl.load(MidLse + base + offs_s, mask=offs_s < TOTAL_SLOTS, other=float("-inf"))
        valid = lse > float("-inf")
    else:
        seq_len = tl.load(SeqLens + b).to(tl.int32)
        n_splits, split_len = _split_plan(seq_len, MAX_SPLITS, MIN_SPLIT, BLOCK_N)
        valid = (offs_s < n_splits) & (offs_s * split_len < seq_len)
        lse = tl.load(MidLse + base + offs_s, mask=valid, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(valid, tl.exp2(lse - m), 0.0)
    part = tl.load(MidO + b.to(tl.int64) * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms
                   + offs_d[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
    total = tl.sum(w, 0)
    # A padded batch row (seq_len 0) has no spans: write zeros rather than 0/0.
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=mask_d)


def decode_launch_config(dtype: torch.dtype, fp8: bool) -> tuple[int, int, int, int | None]:
    """(BLOCK_N, warps, stages, register cap or None) of the split kernel, from `python
    benchmarks/attention.py --sweep` on an H100 (batch 256, ~800-token contexts): bf16 64/2/2 at
    2.73 TB/s. An fp8 pool is bound by latency rather than bytes (its scale loads and e4m3 conversion
    sit on each tile's path), so it wants many small programs in flight: 32/1/2 runs 22-32% faster than
    128/4/2 at batch 64-256. Register caps (more warps an SM) only slowed it."""
    if fp8:
        return 32, 1, 2, None
    return (64, 2, 2, None) if dtype != torch.float32 else (32, 4, 2, None)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_kv_splits(batch_size: int, num_kv_heads: int, sm_count: int) -> int:
    """Upper bound on spans per (sequence, kv head); sequences shorter than MIN_SPLIT_TOKENS × bound
    use fewer (decided on the device). It depends only on shapes, so a CUDA graph captured for a
    batch size stays valid.

    Short spans keep more loads in flight even when the batch alone fills the GPU: on an H100 with
    ~1k contexts, 4-8 spans beat 1-2 by 5-10% at batch 64-256. Small batches get more spans, enough
    programs for a few waves over the SMs.
    """
    want = math.ceil(4 * sm_count / max(batch_size * num_kv_heads, 1))
    return min(MAX_KV_SPLITS, max(DEFAULT_KV_SPLITS, next_pow2(want)))


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                     scales: tuple[torch.Tensor, torch.Tensor] | tuple[None, None], out: torch.Tensor,
                     batch: ForwardBatch, mid_o: torch.Tensor, mid_lse: torch.Tensor, splits: int,
                     shared: SharedPrefixes | None, total_slots: int, scale: float) -> None:
    """out[b] = attention of q[b] over its sequence's cached K/V (positions from shared.starts[b] on when
    a shared-prefix pass already wrote its spans into mid_o/mid_lse). mid_o [B, H, total_slots, D] and
    mid_lse [B, H, total_slots] are the spans' scratch; slots [0, splits) are this kernel's."""
    b, heads, dim = q.shape
    kv_heads = k_buf.shape[1]
    group = heads // kv_heads
    fp8 = scales[0] is not None
    block_n, warps, stages, maxnreg = decode_launch_config(q.dtype, fp8)
    block_d = next_pow2(dim)
    table = batch.req_to_token
    k_scale, v_scale = scales if fp8 else (k_buf, v_buf)
    _decode_split_kernel[(kv_heads, b, splits)](
        q, k_buf, v_buf, k_scale, v_scale, table, batch.req_rows, batch.seq_lens,
        shared.starts if shared is not None else batch.seq_lens, mid_o, mid_lse, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        *scale_strides(*scales),
        table.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=dim, BLOCK_H=max(16, next_pow2(group)), BLOCK_D=block_d,
        BLOCK_N=block_n, MAX_SPLITS=splits, MIN_SPLIT=MIN_SPLIT_TOKENS,
        DOT_PRECISION=dot_precision(q.dtype), FP8=fp8, HAS_START=shared is not None,
        DIRECT=splits == 1 and shared is None, num_warps=warps, num_stages=stages, maxnreg=maxnreg)
    if splits > 1 or shared is not None:
        _decode_merge_kernel[(b, heads)](
            mid_o, mid_lse, batch.seq_lens, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=next_pow2(total_slots), BLOCK_N=block_n,
            MAX_SPLITS=splits, MIN_SPLIT=MIN_SPLIT_TOKENS, TOTAL_SLOTS=total_slots if shared is not None else 0,
            num_warps=1 if block_d <= 64 else 2)
