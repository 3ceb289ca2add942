"""Elementwise chains fused by torch.compile on CUDA (each is a plain torch function on CPU).

A decode step of a small model launches hundreds of tiny elementwise kernels (norms, rotary, the
gated activation); compiling these few functions turns each chain into one kernel. The eager
versions stay the reference and run wherever compilation is off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


class Kernels:
    """The functions the model calls; `compile()` swaps in fused versions."""
    rms_norm = staticmethod(rms_norm)
    silu_mul = staticmethod(silu_mul)
    apply_rotary = staticmethod(apply_rotary)
    compiled = False

    @classmethod
    def compile(cls) -> None:
        if cls.compiled:
            return
        opts = dict(dynamic=True, fullgraph=True)
        cls.rms_norm = staticmethod(torch.compile(rms_norm, **opts))
        cls.silu_mul = staticmethod(torch.compile(silu_mul, **opts))
        cls.apply_rotary = staticmethod(torch.compile(apply_rotary, **opts))
        cls.compiled = True
