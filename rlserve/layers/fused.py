"""Elementwise chains (norms, rotary, the gated activation) and the kernel sets a model runs them with.

A decode step of a small model launches hundreds of tiny elementwise kernels; fusing each chain into
one kernel removes most of them. `Kernels.for_mode(Elementwise.X)` gives one set of the five functions:
EAGER the plain torch functions below (the reference), INDUCTOR torch.compile'd versions, TRITON the
Triton kernels of triton_elementwise.py for the CUDA inputs they serve (the compiled versions for the
rest). A model holds the set its engine chose, so two engines in one process can run different sets;
the compiled and Triton function objects are shared process-wide (compiling is expensive).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlserve.config import Elementwise

log = logging.getLogger("rlserve")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # One dispatch for the whole chain (aten's rms_norm, bitwise the same in float32): at batch 1 on a
        # CPU each op of the chain below costs more in dispatch than in arithmetic.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
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
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if cos.dtype != q.dtype:          # (a float32 model's tables are its dtype already: no call)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head q/k RMSNorm followed by rotary, one pass over q and k."""
    return apply_rotary(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin)


# (sin, cos for heads, signed sin for heads) of the last forward pass: see apply_rotary_rolled.
_ROLLED_TABLES: tuple[Any, Any, Any] = (None, None, None)


def apply_rotary_rolled(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary bit for bit in fewer ops, for eager runs (a CPU decode step pays for each op in
    dispatch): rotate-half times sin is roll(x, D/2) times sin with its first half negated (x2·(−s1)
    equals (−x2)·s1 exactly), and the tables for the heads' broadcast are made once per forward pass.
    Every layer of a pass gets the same cos/sin tensors, so a one-entry cache keyed by the sin tensor's
    identity (held, so no other tensor can take its id) serves the other layers: 8 ops a layer instead
    of 14. Not for torch.compile (the cache is Python state); INDUCTOR compiles apply_rotary."""
    global _ROLLED_TABLES
    cached = _ROLLED_TABLES
    if cached[0] is sin and cached[1].dtype == q.dtype:
        c, s = cached[1], cached[2]
    else:
        half = sin.shape[-1] // 2
        c, s = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
        if c.dtype != q.dtype:
            c, s = c.to(q.dtype), s.to(q.dtype)
        _ROLLED_TABLES = (sin, c, s)
    half = q.shape[-1] // 2
    return q * c + q.roll(half, -1) * s, k * c + k.roll(half, -1) * s


def qk_norm_rotary_rolled(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                          eps: float, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_norm_rotary with apply_rotary_rolled."""
    return apply_rotary_rolled(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin)


class _Fused:
    """The compiled version of `fn` for inference calls; the eager one under autograd (training calls
    the same model with gradients, and every grad mode, dtype and engine in a process would be one
    more recompile) and for good once dynamo gives up on it (its recompile limit, an unsupported
    input): a fused kernel is a speed-up, never a reason to fail a forward pass."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        self.failed = False

    def __call__(self, *args: Any) -> Any:
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

    def __init__(self, kernel: Callable[..., Any], other: Callable[..., Any], serves: Callable[..., bool]) -> None:
        self.kernel, self.other, self.serves = kernel, other, serves

    def __call__(self, *args: Any) -> Any:
        if args[0].is_cuda and not torch.is_grad_enabled() and self.serves(*args):
            return self.kernel(*args)
        return self.other(*args)


@dataclass(frozen=True)
class Kernels:
    """The elementwise functions one model calls (the layers read them from the set their model holds)."""
    mode: Elementwise
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    apply_rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                           tuple[torch.Tensor, torch.Tensor]]
    qk_norm_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    @staticmethod
    def for_mode(mode: Elementwise) -> Kernels:
        """The set for a resolved mode (AUTO depends on the device: the engine resolves it first). The
        same object for every call with one mode."""
        if mode is Elementwise.AUTO:
            raise ValueError("Elementwise.AUTO depends on the device; resolve it before asking for kernels")
        return _kernel_set(Elementwise(mode))


EAGER = Kernels(Elementwise.EAGER, rms_norm, add_rms_norm, silu_mul, apply_rotary_rolled, qk_norm_rotary_rolled)


@functools.cache
def _kernel_set(mode: Elementwise) -> Kernels:
    if mode is Elementwise.EAGER:
        return EAGER
    if mode is Elementwise.INDUCTOR:
        # Several engines (dtypes, devices) in one process each add a specialisation.
        dynamo = torch._dynamo.config
        name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, name, max(getattr(dynamo, name), 64))
        return Kernels(mode, _Fused(rms_norm), _Fused(add_rms_norm), _Fused(silu_mul), _Fused(apply_rotary),
                       _Fused(qk_norm_rotary))
    from rlserve.layers import triton_elementwise as te
    if not te.HAS_TRITON:
        raise RuntimeError("Elementwise.TRITON needs the `triton` package")
    other = _kernel_set(Elementwise.INDUCTOR)
    return Kernels(mode, _OnCuda(te.rms_norm, other.rms_norm, te.norm_supported),
                   _OnCuda(te.add_rms_norm, other.add_rms_norm, te.add_norm_supported),
                   _OnCuda(te.silu_mul, other.silu_mul, te.silu_mul_supported),
                   _OnCuda(te.apply_rotary, other.apply_rotary, te.rotary_supported),
                   _OnCuda(te.qk_norm_rotary, other.qk_norm_rotary, te.qk_norm_rotary_supported))
