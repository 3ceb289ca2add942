"""Triton attention over the token-indexed KV pool: the fused KV store, then split-K decode
(triton_decode.py, with cascade.py's shared-prefix pass where a batch carries shared prefixes) or
extend (triton_extend.py). Launch configs are the kernels' own (triton_decode.decode_launch_config,
triton_extend.extend_launch_config); the sweeps in benchmarks/ override those functions.
"""
from __future__ import annotations

import torch

from rlserve.kv_pool import KVPool
from rlserve.layers.attention import triton_decode
from rlserve.layers.attention.base import ForwardBatch
from rlserve.layers.attention.cascade import CASCADE_PREFIX_SPLITS, shared_prefix_attention
from rlserve.layers.attention.triton_common import LOG2E, next_pow2, scale_strides
from rlserve.layers.attention.triton_extend import extend_attention

# CPU-only installs still import this module; the backend refuses to build without Triton.
from rlserve.layers.triton_support import HAS_TRITON, jit, last_dim_contiguous, tl


@jit
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
    if FP8:   # one scale per head: amax / 448, the same rule as kv_pool.quantize_fp8
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
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    fp8 = k_scale is not None
    _store_kv_kernel[(t,)](
        k, v, k_buf, v_buf, k_scale if fp8 else k_buf, v_scale if fp8 else v_buf, loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1), *scale_strides(k_scale, v_scale),
        NUM_HEADS=heads, HEAD_DIM=dim, BLOCK_H=next_pow2(heads), BLOCK_D=next_pow2(dim), FP8=fp8,
        num_warps=4 if heads * dim >= 1024 else 1)


class TritonAttentionBackend:
    def __init__(self, pool: KVPool, scale: float, num_heads: int | None = None) -> None:
        if not HAS_TRITON:
            raise RuntimeError("the triton attention backend needs the `triton` package")
        self.pool = pool
        self.scale = scale
        self._sms = triton_decode.num_sms(pool.k_buffers[0].device) if pool.num_layers else 132
        self._splits = 1
        self._cu_extend = torch.zeros(1, dtype=torch.int64)     # set by prepare() for an extend batch
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
            self._splits = triton_decode.decode_kv_splits(batch.batch_size, self.pool.num_kv_heads, self._sms)
            self._prefix_splits = 0 if batch.shared_prefixes is None else CASCADE_PREFIX_SPLITS
        else:
            cu = torch.zeros(batch.batch_size + 1, dtype=torch.int64, device=batch.extend_lens.device)
            torch.cumsum(batch.extend_lens, 0, out=cu[1:])
            self._cu_extend = cu
            self._max_extend = max(batch.extend_lens_cpu)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                batch: ForwardBatch) -> torch.Tensor:
        k_buf, v_buf = self.pool.k_buffers[layer], self.pool.v_buffers[layer]
        ks, vs = self.pool.k_scales, self.pool.v_scales
        scales = (ks[layer], vs[layer]) if ks is not None and vs is not None else (None, None)
        store_kv(k_buf, v_buf, batch.out_cache_loc, k, v, *scales)
        q = last_dim_contiguous(q)
        t, heads, dim = q.shape
        out = q.new_empty(t, heads, dim)
        if batch.is_decode:
            self._decode(q, k_buf, v_buf, scales, out, batch)
        else:
            extend_attention(q, last_dim_contiguous(k), last_dim_contiguous(v), k_buf, v_buf, scales, out, batch,
                             self._cu_extend, self._max_extend, self.scale)
        return out.view(t, heads * dim)

    def _decode(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, scales: tuple,
                out: torch.Tensor, batch: ForwardBatch) -> None:
        b, heads, dim = q.shape
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
        if shared is not None:
            shared_prefix_attention(q, k_buf, v_buf, scales[0], scales[1], batch.req_to_token, shared, mid_o,
                                    mid_lse, first_slot=splits, prefix_splits=self._prefix_splits,
                                    qk_scale=self.scale * LOG2E)
        triton_decode.decode_attention(q, k_buf, v_buf, scales, out, batch, mid_o, mid_lse, splits, shared, total,
                                       self.scale)
