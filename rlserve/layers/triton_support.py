"""Triton as an optional dependency: the modules that define kernels import it from here, so that a
CPU-only install still imports them (their kernels are then plain functions that nothing launches)."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False


def jit(fn):
    """triton.jit where Triton is installed; the function unchanged elsewhere."""
    return triton.jit(fn) if HAS_TRITON else fn


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x, copied only if its last dim is strided (the kernels index rows by stride, elements by 1)."""
    return x if x.stride(-1) == 1 else x.contiguous()
