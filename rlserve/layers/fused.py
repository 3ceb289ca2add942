"""Elementwise chains, fused on CUDA (each is a plain torch function on CPU): by Triton kernels with
compile="triton" (the CUDA default, triton_elementwise.py), by torch.compile with compile=True and for
the shapes the Triton kernels don't serve.

A decode step of a small model launches hundreds of tiny elementwise kernels (norms, rotary, the
gated activation); compiling these few functions turns each chain into one kernel. The eager
versions stay the reference and run wherever compilation is off.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("rlserve")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm in one pass: (rms_norm(x + delta), x + delta)."""
    summed = x + delta
    return rms_norm(summed, weight, eps), summed


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head q/k RMSNorm followed by rotary, one pass over q and k."""
    return apply_rotary(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin)


class _Fused:
    """The compiled version of `fn` for inference calls; the eager one under autograd (training calls
    the same model with gradients, and every grad mode, dtype and engine in a process would be one
    more recompile) and for good once dynamo gives up on it (its recompile limit, an unsupported
    input): a fused kernel is a speed-up, never a reason to fail a forward pass."""

    def __init__(self, fn) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        self.failed = False

    def __call__(self, *args):
        if self.failed or torch.is_grad_enabled():
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except Exception as e:   # noqa: BLE001 - the eager call below re-raises any real error
            self.failed = True
            log.warning("torch.compile of %s failed (%s: %s); using the eager version",
                        self.eager.__name__, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return self.eager(*args)


class _OnCuda:
    """A Triton kernel for CUDA inputs outside autograd where it serves the shapes; `other` (compiled
    or eager) everywhere else."""

    def __init__(self, kernel, other, serves) -> None:
        self.kernel, self.other, self.serves = kernel, other, serves

    def __call__(self, *args):
        if args[0].is_cuda and not torch.is_grad_enabled() and self.serves(*args):
            return self.kernel(*args)
        return self.other(*args)


class Kernels:
    """The functions the model calls; `compile()` swaps in fused versions."""
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    silu_mul = staticmethod(silu_mul)
    apply_rotary = staticmethod(apply_rotary)
    qk_norm_rotary = staticmethod(qk_norm_rotary)
    compiled = False
    triton_elementwise = False

    @classmethod
    def compile(cls, triton_elementwise: bool = False) -> None:
        """Swap in the compiled functions (once a process); with `triton_elementwise`, Triton kernels
        instead for CUDA inputs (from then on, for every engine in the process)."""
        if not cls.compiled:
            cls._compile()
        if triton_elementwise and not cls.triton_elementwise:
            from rlserve.layers import triton_elementwise as te
            if not te.HAS_TRITON:
                raise RuntimeError("compile='triton' needs the `triton` package")
            cls.rms_norm = staticmethod(_OnCuda(te.rms_norm, cls.rms_norm, te.norm_supported))
            cls.add_rms_norm = staticmethod(_OnCuda(te.add_rms_norm, cls.add_rms_norm, te.add_norm_supported))
            cls.silu_mul = staticmethod(_OnCuda(te.silu_mul, cls.silu_mul, te.silu_mul_supported))
            cls.apply_rotary = staticmethod(_OnCuda(te.apply_rotary, cls.apply_rotary, te.rotary_supported))
            cls.qk_norm_rotary = staticmethod(_OnCuda(te.qk_norm_rotary, cls.qk_norm_rotary,
                                                      te.qk_norm_rotary_supported))
            cls.triton_elementwise = True

    @classmethod
    def _compile(cls) -> None:
        # Several engines (dtypes, devices) in one process each add a specialisation.
        dynamo = torch._dynamo.config
        name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, name, max(getattr(dynamo, name), 64))
        cls.rms_norm = staticmethod(_Fused(rms_norm))
        cls.add_rms_norm = staticmethod(_Fused(add_rms_norm))
        cls.silu_mul = staticmethod(_Fused(silu_mul))
        cls.apply_rotary = staticmethod(_Fused(apply_rotary))
        cls.qk_norm_rotary = staticmethod(_Fused(qk_norm_rotary))
        cls.compiled = True
