"""The KV pool: per-layer K and V buffers indexed by slot, read and written by the attention backends.

It sits below both layers/ (the attention kernels read it) and engine/ (which sizes, allocates and
releases it), so neither has to import the other.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                       # largest finite e4m3fn value


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H, D] → (e4m3 values, float32 scales [T, H]) with x ≈ values * scales[..., None].

    One scale per token and head: K/V magnitudes vary a lot between heads and tokens (and are tiny
    under random weights), so a single per-layer scale would flush small values to zero."""
    amax = x.float().abs().amax(dim=-1).clamp_min(1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _gather(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows[index] for an index of any shape. index_select on the flattened index copies whole rows;
    on a CPU it is ~4x faster than advanced indexing (0.63 vs 2.4 ms for 64 x 300 rows of 192 floats)."""
    return torch.index_select(rows, 0, index.reshape(-1)).view(*index.shape, *rows.shape[1:])


class KVPool:
    """Per-layer K and V buffers indexed by slot: k_buffers[layer] is [num_slots, num_kv_heads, head_dim].

    num_slots counts slot 0, so a pool serving TokenAllocator(size) needs num_slots = size + 1.
    With dtype float8_e4m3fn the pool also keeps a float32 scale per (slot, kv head) in k_scales /
    v_scales; `load` returns dequantised values. A scale tensor is indexed [slot, kv head] but stored
    head-major (strides (1, num_slots)): a decode kernel reads one head's scales of consecutive slots,
    and head-major those share memory sectors instead of each taking one (5% of fp8 decode time).
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_layers, self.num_slots = num_layers, num_slots
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.fp8 = dtype == FP8_DTYPE
        shape = (num_slots, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_scales: list[torch.Tensor] | None = None
        self.v_scales: list[torch.Tensor] | None = None
        if self.fp8:
            self.k_scales = [self._new_scales(device) for _ in range(num_layers)]
            self.v_scales = [self._new_scales(device) for _ in range(num_layers)]

    def _new_scales(self, device: torch.device | str) -> torch.Tensor:
        """Zeroed float32 scales, [num_slots, num_kv_heads], stored head-major."""
        return torch.zeros(self.num_kv_heads, self.num_slots, dtype=torch.float32, device=device).t()

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.fp8:
            # index_copy_ rather than `buf[slots] = x`: the same write without Python's indexing path
            # (at batch 1 on a CPU that path cost more than the copy).
            self.k_buffers[layer].index_copy_(0, slots, k if k.dtype == self.dtype else k.to(self.dtype))
            self.v_buffers[layer].index_copy_(0, slots, v if v.dtype == self.dtype else v.to(self.dtype))
            return
        for bufs, scales, x in ((self.k_buffers, self.k_scales, k), (self.v_buffers, self.v_scales, v)):
            assert scales is not None          # an fp8 pool always has them
            values, scale = quantize_fp8(x)
            bufs[layer][slots] = values
            scales[layer][slots] = scale

    def load(self, layer: int, index: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the slots in `index` (any shape) as `dtype`, dequantised for an fp8 pool."""
        k, v = _gather(self.k_buffers[layer], index).to(dtype), _gather(self.v_buffers[layer], index).to(dtype)
        if self.k_scales is not None and self.v_scales is not None:
            k = k * _gather(self.k_scales[layer], index)[..., None].to(dtype)
            v = v * _gather(self.v_scales[layer], index)[..., None].to(dtype)
        return k, v

    def set_resident(self, resident: bool) -> None:
        """Free every layer's K/V storage (False: empty tensors) or allocate it again, zeroed (True).
        The lists stay the same objects, so backends holding the pool follow; addresses change."""
        shape = (self.num_slots, self.num_kv_heads, self.head_dim)
        for tensors in (self.k_buffers, self.v_buffers):
            for i, old in enumerate(tensors):
                tensors[i] = torch.zeros(shape if resident else (0,), dtype=old.dtype, device=old.device)
        for scales in [s for s in (self.k_scales, self.v_scales) if s is not None]:
            for i, old in enumerate(scales):
                scales[i] = self._new_scales(old.device) if resident else torch.zeros(0, device=old.device)

    def zero_(self) -> None:
        """Zero every buffer and scale in place (pages mapped again after a release hold garbage)."""
        for t in [*self.k_buffers, *self.v_buffers, *(self.k_scales or []), *(self.v_scales or [])]:
            t.zero_()

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        scales = 4 if dtype == FP8_DTYPE else 0      # one float32 scale per head
        return 2 * num_layers * num_kv_heads * (head_dim * element + scales)
