"""Triton attention over the token-indexed KV pool: fused KV store, split-K decode, extend.

Decode (one new token per sequence) is memory-bound: each program reads one span of one sequence's
K/V for one kv head and serves every query head of that group, so K/V cross HBM once. Long contexts
are cut into several spans (flash-decoding) whose partial results a second kernel merges. The grid
depends only on the batch size; the per-sequence span count is worked out on the device from
seq_lens, so a decode step never syncs with the host and can be captured in a CUDA graph.

Extend (prefill chunks) runs a flash-attention loop per (sequence, query head, block of new tokens):
first over the cached prefix, gathered through req_to_token, then causally over the new tokens.

An fp8 (e4m3) pool stores a float32 scale per (slot, kv head). The kernels load the 1-byte values,
run the dots in fp16 in decode (the hardware converts e4m3 to fp16 in one instruction; the query's
dtype elsewhere) and apply the scales after them — a column of q·kᵀ for K, a column
of the softmax weights for V — so dequantising costs one extra 4-byte load per token and head.
"""
from __future__ import annotations

import math

import torch

from rlserve.kv_pool import KVPool
from rlserve.layers.attention.base import ForwardBatch
# CPU-only installs still import this module; the backend refuses to build without Triton.
from rlserve.layers.triton_support import HAS_TRITON, tl, triton
from rlserve.layers.triton_support import jit as _jit
from rlserve.layers.triton_support import last_dim_contiguous as _last_dim_contiguous

_LOG2E = 1.4426950408889634
MAX_KV_SPLITS = 16        # upper bound on spans per (sequence, kv head)
DEFAULT_KV_SPLITS = 8     # the bound used once the batch alone fills the GPU
MIN_SPLIT_TOKENS = 256    # a sequence is cut into spans of at least this many tokens
# Base-2 exponent by which a row's running max may lag its true max before the accumulator is rescaled.
RESCALE_SLACK = tl.constexpr(8.0) if HAS_TRITON else 8.0
# Spans per shared prefix (cascade). Fixed, so that the kernels' compile-time shapes never change from
# step to step (each new combination would compile anew) and a CUDA graph captured for a batch size
# serves every grouping; each span's length follows the prefix's length on the device.
CASCADE_PREFIX_SPLITS = 4


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------------
# KV store
# ---------------------------------------------------------------------------------------------
@_jit
def _store_kv_kernel(K, V, K_buf, V_buf, K_scale, V_scale, Loc,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kbt, stride_kbh, stride_vbt, stride_vbh, stride_ss, stride_sh,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Loc + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < NUM_HEADS
    mask = mask_h[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if FP8:   # one scale per head: amax / 448, the same rule as cache.quantize_fp8
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        ks = tl.maximum(tl.max(tl.abs(k), 1), 1e-12) / 448.0
        vs = tl.maximum(tl.max(tl.abs(v), 1), 1e-12) / 448.0
        k = tl.clamp(k / ks[:, None], -448.0, 448.0)
        v = tl.clamp(v / vs[:, None], -448.0, 448.0)
        tl.store(K_scale + slot * stride_ss + offs_h * stride_sh, ks, mask=mask_h)
        tl.store(V_scale + slot * stride_ss + offs_h * stride_sh, vs, mask=mask_h)
    tl.store(K_buf + slot * stride_kbt + offs_h[:, None] * stride_kbh + offs_d[None, :],
             k.to(K_buf.dtype.element_ty), mask=mask)
    tl.store(V_buf + slot * stride_vbt + offs_h[:, None] * stride_vbh + offs_d[None, :],
             v.to(V_buf.dtype.element_ty), mask=mask)


def store_kv(k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """k_buf[loc] = k; v_buf[loc] = v (cast to the pool's dtype; quantised with per-head scales into
    k_scale/v_scale for an fp8 pool) in one launch."""
    t, heads, dim = k.shape
    if t == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    fp8 = k_scale is not None
    _store_kv_kernel[(t,)](
        k, v, k_buf, v_buf, k_scale if fp8 else k_buf, v_scale if fp8 else v_buf, loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1), *_scale_strides(k_scale, v_scale),
        NUM_HEADS=heads, HEAD_DIM=dim, BLOCK_H=_next_pow2(heads), BLOCK_D=_next_pow2(dim), FP8=fp8,
        num_warps=4 if heads * dim >= 1024 else 1)


# ---------------------------------------------------------------------------------------------
# Decode: split-K over the context, all query heads of a kv group in one program
# ---------------------------------------------------------------------------------------------
@_jit
def _split_plan(seq_len, MAX_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """How many spans a sequence gets and how long each is (a multiple of BLOCK_N)."""
    n_splits = tl.minimum((seq_len + MIN_SPLIT - 1) // MIN_SPLIT, MAX_SPLITS)
    per_split = (seq_len + tl.maximum(n_splits, 1) - 1) // tl.maximum(n_splits, 1)
    split_len = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    return n_splits, split_len


@_jit
def _attend_span(q, K_buf, V_buf, K_scale, V_scale, ReqToToken, row, start, end, kvh, qk_scale,
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


@_jit
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

    m_i, l_i, acc = _attend_span(q, K_buf, V_buf, K_scale, V_scale, ReqToToken, row, start, end, kvh, qk_scale,
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


@_jit
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


# ---------------------------------------------------------------------------------------------
# Extend: new tokens over their cached prefix, then causally over themselves
# ---------------------------------------------------------------------------------------------
@_jit
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


@_jit
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


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------
def _scale_strides(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple[int, int]:
    """(slot stride, head stride) of an fp8 pool's [slot, kv head] scales, K's and V's alike; (0, 0)
    for a pool without scales."""
    if k_scale is None:
        return 0, 0
    if k_scale.stride() != v_scale.stride():
        raise ValueError(f"K and V scales must share strides, got {k_scale.stride()} and {v_scale.stride()}")
    return k_scale.stride(0), k_scale.stride(1)


def _dot_precision(dtype: torch.dtype) -> str:
    # Triton's default for float32 dots is tf32 (about 3e-4 relative error); float32 asks for exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _decode_launch(dtype: torch.dtype, fp8: bool) -> tuple[int, int, int, int | None]:
    """(BLOCK_N, warps, stages, register cap or None) of the decode kernel, from `python -m
    rlserve.bench.attention --sweep` on an H100 (batch 256, ~800-token contexts): bf16 64/2/2 at
    2.73 TB/s. An fp8 pool is bound by latency rather than bytes (its scale loads and e4m3 conversion
    sit on each tile's path), so it wants many small programs in flight: 32/1/2 runs 22-32% faster than
    128/4/2 at batch 64-256. Register caps (more warps an SM) only slowed it (docs/benchmarks.md)."""
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
    return min(MAX_KV_SPLITS, max(DEFAULT_KV_SPLITS, _next_pow2(want)))


class TritonAttentionBackend:
    def __init__(self, pool: KVPool, scale: float, max_kv_splits: int | None = None,
                 decode_launch: tuple[int, int, int, int | None] | None = None, num_heads: int | None = None,
                 extend_launch: tuple[int, int, int, int] | None = None) -> None:
        if not HAS_TRITON:
            raise RuntimeError("the triton attention backend needs the `triton` package")
        self.pool = pool
        self.scale = scale
        self.max_kv_splits = max_kv_splits        # None: chosen from the batch size
        self.decode_launch = decode_launch        # (BLOCK_N, warps, stages, maxnreg) override, for sweeps
        self.extend_launch = extend_launch        # (BLOCK_M, BLOCK_N, warps, stages) override, likewise
        self._sms = num_sms(pool.k_buffers[0].device) if pool.num_layers else 132
        self._splits = 1
        self._cu_extend: torch.Tensor | None = None
        self._max_extend = 0
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prefix_splits = 0   # spans per shared prefix this step (0: no shared-prefix pass)
        # Decode batches may carry shared prefixes (cascade attention): at most this many requests
        # share one pass, so that members × query heads per kv head stay within 64 rows of a dot.
        # 0 (query head count unknown): the engine sends no shared prefixes.
        group = num_heads // pool.num_kv_heads if num_heads and pool.num_kv_heads else 0
        self.cascade_max_members = max(2, 64 // group) if group else 0

    def prepare(self, batch: ForwardBatch) -> None:
        self._scratch = None    # reallocated by the first layer, then shared by all layers
        if batch.is_decode:
            self._splits = self.max_kv_splits or decode_kv_splits(
                batch.batch_size, self.pool.num_kv_heads, self._sms)
            shared = batch.shared_prefixes
            self._prefix_splits = 0 if shared is None else CASCADE_PREFIX_SPLITS
        else:
            cu = torch.zeros(batch.batch_size + 1, dtype=torch.int64, device=batch.extend_lens.device)
            torch.cumsum(batch.extend_lens, 0, out=cu[1:])
            self._cu_extend = cu
            self._max_extend = max(batch.extend_lens_cpu)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                batch: ForwardBatch) -> torch.Tensor:
        k_buf, v_buf = self.pool.k_buffers[layer], self.pool.v_buffers[layer]
        scales = (self.pool.k_scales[layer], self.pool.v_scales[layer]) if self.pool.fp8 else (None, None)
        store_kv(k_buf, v_buf, batch.out_cache_loc, k, v, *scales)
        q = _last_dim_contiguous(q)
        t, heads, dim = q.shape
        out = q.new_empty(t, heads, dim)
        if batch.is_decode:
            self._decode(q, k_buf, v_buf, scales, out, batch)
        else:
            self._extend(q, _last_dim_contiguous(k), _last_dim_contiguous(v), k_buf, v_buf, scales, out, batch)
        return out.view(t, heads * dim)

    def _decode(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, scales: tuple,
                out: torch.Tensor, batch: ForwardBatch) -> None:
        b, heads, dim = q.shape
        kv_heads = k_buf.shape[1]
        group = heads // kv_heads
        splits = self._splits
        shared = batch.shared_prefixes if self._prefix_splits else None
        total = splits + self._prefix_splits
        if self._scratch is None or self._scratch[0].shape[:3] != (b, heads, total):
            mid_o = torch.empty(b, heads, total, dim, dtype=torch.float32, device=q.device)
            # With a shared-prefix pass the merge finds written spans by a finite lse. Every layer of
            # a step writes the same spans, so presetting once per step is enough.
            mid_lse = (torch.full((b, heads, total), float("-inf"), device=q.device) if shared is not None
                       else torch.empty(b, heads, total, dtype=torch.float32, device=q.device))
            self._scratch = (mid_o, mid_lse)
        mid_o, mid_lse = self._scratch
        block_n, warps, stages, maxnreg = self.decode_launch or _decode_launch(q.dtype, fp8=self.pool.fp8)
        block_d = _next_pow2(dim)
        table = batch.req_to_token
        fp8 = scales[0] is not None
        k_scale, v_scale = scales if fp8 else (k_buf, v_buf)
        if shared is not None:
            from rlserve.layers.attention.cascade import shared_prefix_attention
            shared_prefix_attention(q, k_buf, v_buf, k_scale if fp8 else None, v_scale if fp8 else None, table,
                                    shared, mid_o, mid_lse, first_slot=splits,
                                    prefix_splits=self._prefix_splits, qk_scale=self.scale * _LOG2E)
        _decode_split_kernel[(kv_heads, b, splits)](
            q, k_buf, v_buf, k_scale, v_scale, table, batch.req_rows, batch.seq_lens,
            shared.starts if shared is not None else batch.seq_lens, mid_o, mid_lse, out,
            self.scale * _LOG2E,
            q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
            *_scale_strides(*scales),
            table.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
            GROUP=group, HEAD_DIM=dim, BLOCK_H=max(16, _next_pow2(group)), BLOCK_D=block_d,
            BLOCK_N=block_n, MAX_SPLITS=splits, MIN_SPLIT=MIN_SPLIT_TOKENS,
            DOT_PRECISION=_dot_precision(q.dtype), FP8=fp8, HAS_START=shared is not None,
            DIRECT=splits == 1 and shared is None, num_warps=warps, num_stages=stages, maxnreg=maxnreg)
        if splits > 1 or shared is not None:
            _decode_merge_kernel[(b, heads)](
                mid_o, mid_lse, batch.seq_lens, out,
                mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
                out.stride(0), out.stride(1),
                HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=_next_pow2(total), BLOCK_N=block_n,
                MAX_SPLITS=splits, MIN_SPLIT=MIN_SPLIT_TOKENS, TOTAL_SLOTS=total if shared is not None else 0,
                num_warps=1 if block_d <= 64 else 2)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor,
                v_buf: torch.Tensor, scales: tuple, out: torch.Tensor, batch: ForwardBatch) -> None:
        heads, dim = q.shape[1], q.shape[2]
        group = heads // k.shape[1]
        block_d = _next_pow2(dim)
        if self.extend_launch is not None:
            block_m, block_n, warps, stages = self.extend_launch
        elif q.element_size() <= 2 and block_d <= 128:
            # H100, graph-timed (docs/benchmarks.md, "Extend attention: unmasked blocks below the diagonal"):
            # 64/32/4/3 is the fastest config on prefill chunks like the offline workload's (14 x 585 new
            # tokens 121.8 us, 64 x 300 224.4 us) and within 4% on 16 x 1,024; 128/32/4/3 wins long prefixes
            # (4 x 2,048 after 2,048: 642 against 737 us).
            block_m, block_n, warps, stages = 64, 32, 4, 3
        elif q.element_size() <= 2:
            block_m, block_n, warps, stages = 64, 32, 4, 2
        else:
            block_m, block_n, warps, stages = 32, 32, 4, 1
        table = batch.req_to_token
        grid = (batch.batch_size, heads, triton.cdiv(self._max_extend, block_m))
        fp8 = scales[0] is not None
        k_scale, v_scale = scales if fp8 else (k_buf, v_buf)
        _extend_kernel[grid](
            q, k, v, out, k_buf, v_buf, k_scale, v_scale, table, batch.req_rows, batch.seq_lens,
            batch.extend_lens, self._cu_extend, self.scale * _LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
            *_scale_strides(*scales), table.stride(0),
            GROUP=group, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            DOT_PRECISION=_dot_precision(q.dtype), FP8=fp8, num_warps=warps, num_stages=stages)
