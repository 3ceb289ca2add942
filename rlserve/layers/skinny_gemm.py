"""A Triton GEMM for the few-row products of a decode step: y = x @ wᵀ with x [M, K], M ≤ MAX_ROWS.

A decode step multiplies a batch of at most a few hundred rows by each weight matrix. cuBLAS tiles such a
product into a handful of thread blocks (an output 1,024 wide is 8 blocks of 128 columns), so most SMs
idle while the weights stream: on an H100 the four GEMMs of a qwen3-0.6b layer (30 MB of weights) took
24-31 µs at every batch from 1 to 256, ~1.0-1.3 TB/s of the card's 3.35 (docs/benchmarks.md, "Decode
GEMMs"). Here every program owns a narrow block of output columns and, where the columns alone give too
few programs to cover the SMs, a slice of K as well (split-K).

Split-K partial sums are added in a fixed order, so results never depend on timing: each program stores
its float32 partial, then counts itself done on a per-column-block counter; the program that arrives
last adds the partials in split order, writes the output and resets the counter to zero for the next
launch (so a CUDA graph can replay it). The reduction order over K inside a program does not depend on
M either, so a batch padded for a CUDA graph gets the same rows as the unpadded one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlserve.layers.triton_support import HAS_TRITON, tl, triton
from rlserve.layers.triton_support import jit as _jit

MAX_ROWS = 256   # larger batches stay with cuBLAS, which tiles them well


@dataclass(frozen=True)
class GemmLaunch:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    target_programs: int   # split K until the grid has about this many programs


def default_launch(rows: int) -> GemmLaunch:
    """The launch for a block of `rows` (a power of two, ≥ 16)."""
    if rows <= 64:
        return GemmLaunch(block_n=32, block_k=128, num_warps=4, num_stages=4, target_programs=256)
    return GemmLaunch(block_n=64, block_k=64, num_warps=8, num_stages=3, target_programs=256)


@_jit
def _skinny_gemm_kernel(X, W, Y, Partial, Counters, M, N, K, k_per_split, num_splits,
                        stride_xm, stride_wn, stride_ym,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT: tl.constexpr):
    # The split count is a runtime value (one compiled kernel serves every weight shape); SPLIT says
    # only whether there is more than one.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if not SPLIT:
        tl.store(out_ptrs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        # Partial[split, m, n], laid out per column block so a block's partials are contiguous.
        block = Partial + pid_n.to(tl.int64) * num_splits * (BLOCK_M * BLOCK_N)
        tile = offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(block + pid_k * (BLOCK_M * BLOCK_N) + tile, acc)
        tl.debug_barrier()   # every thread's partial is written before the count below
        arrived = tl.atomic_add(Counters + pid_n, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(num_splits):   # fixed order: the sum never depends on who came last
                total += tl.load(block + s * (BLOCK_M * BLOCK_N) + tile, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(Y.dtype.element_ty), mask=mask)
            tl.atomic_xchg(Counters + pid_n, 0)


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, partial_elems: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device split-K scratch: float32 partials and int32 counters (all zero between launches).
    Launches on one device share it, which is safe because a device's decode GEMMs run on one stream
    one after another; grown only outside CUDA graph capture (the first eager step of a shape sizes
    it, see `reserve`)."""
    partial, count = _workspaces.get(device, (None, None))
    if partial is None or partial.numel() < partial_elems or count.numel() < counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_gemm workspace must be reserved before CUDA graph capture")
        size = max(partial_elems, 0 if partial is None else partial.numel())
        n = max(counters, 0 if count is None else count.numel())
        partial = torch.empty(size, dtype=torch.float32, device=device)
        count = torch.zeros(n, dtype=torch.int32, device=device)
        _workspaces[device] = (partial, count)
    return partial, count


def _plan(m: int, n: int, k: int, launch: GemmLaunch | None) -> tuple[int, GemmLaunch, int, int, int]:
    block_m = max(16, triton.next_power_of_2(m))
    launch = launch or default_launch(block_m)
    col_blocks = triton.cdiv(n, launch.block_n)
    k_blocks = triton.cdiv(k, launch.block_k)
    split = max(1, min(k_blocks, launch.target_programs // col_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * launch.block_k
    split = triton.cdiv(k, k_per_split)
    return block_m, launch, col_blocks, split, k_per_split


def reserve(max_rows: int, n: int, k: int, device: torch.device, launch: GemmLaunch | None = None) -> None:
    """Size the workspace for products up to [max_rows, k] x [n, k] before a CUDA graph is captured."""
    block_m, launch, col_blocks, split, _ = _plan(max_rows, n, k, launch)
    if split > 1:
        _workspace(device, col_blocks * split * block_m * launch.block_n, col_blocks)


def supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Where the kernel applies: CUDA, a 2-D 16-bit x of at most MAX_ROWS rows, a row-major weight of
    the same dtype, no bias."""
    return (HAS_TRITON and x.is_cuda and bias is None and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.dim() == 2 and weight.shape[1] == x.shape[1]
            and x.stride(1) == 1 and weight.stride(1) == 1)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  launch: GemmLaunch | None = None) -> torch.Tensor:
    """x @ weight.T for x [M, K] (M ≤ MAX_ROWS) and weight [N, K]; bias must be None."""
    if bias is not None:
        raise ValueError("skinny_linear takes no bias")
    m, k = x.shape
    n = weight.shape[0]
    block_m, launch, col_blocks, split, k_per_split = _plan(m, n, k, launch)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if split > 1:
        partial, counters = _workspace(x.device, col_blocks * split * block_m * launch.block_n, col_blocks)
    else:
        partial, counters = y, y
    _skinny_gemm_kernel[(col_blocks, split)](
        x, weight, y, partial, counters, m, n, k, k_per_split, split, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, SPLIT=split > 1,
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return y
