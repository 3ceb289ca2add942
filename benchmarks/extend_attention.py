"""Prefill (extend) attention micro-benchmark: the triton kernel's launch configs against the torch
reference, on sequences of new tokens after an optional cached prefix.

    python benchmarks/extend_attention.py [--shapes 16x1024 4x2048+2048 64x300] [--sweep]

A shape NxL+P is N sequences of L new tokens, each after P cached tokens (P = 0 when omitted). Shapes
default to qwen3-0.6b's attention (16 query heads, 8 kv heads, head_dim 128, bf16). TFLOP/s counts the
multiply-adds of q·kᵀ and p·v over the causal pairs only (4 flops per pair, head and dimension). Every
config's output is compared with the reference, so a fast config that is wrong shows as such.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from rlserve.config import parse_dtype
from rlserve.kv_pool import KVPool
from rlserve.layers.attention import triton_extend
from rlserve.layers.attention.base import ForwardBatch
from rlserve.layers.attention.torch_backend import TorchAttentionBackend

if __package__ in (None, ""):     # run as `python benchmarks/extend_attention.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import graph_time_ms, overriding  # noqa: E402


@dataclass(frozen=True)
class ExtendShape:
    sequences: int
    new: int
    prefix: int = 0

    @staticmethod
    def parse(text: str) -> ExtendShape:
        try:
            head, _, prefix = text.partition("+")
            n, new = head.lower().split("x")
            shape = ExtendShape(int(n), int(new), int(prefix or 0))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {text!r} is not NxL or NxL+P") from None
        if shape.sequences < 1 or shape.new < 1 or shape.prefix < 0:
            raise argparse.ArgumentTypeError(f"shape {text!r} needs N, L >= 1 and P >= 0")
        return shape

    def __str__(self) -> str:
        return f"{self.sequences}x{self.new}+{self.prefix}"


def causal_pairs(shape: ExtendShape) -> int:
    """(query, key) pairs one head attends over: each new token sees the prefix and the new tokens up
    to itself."""
    per_sequence = shape.new * shape.prefix + shape.new * (shape.new + 1) // 2
    return shape.sequences * per_sequence


def extend_flops(shape: ExtendShape, heads: int, head_dim: int) -> int:
    return 4 * causal_pairs(shape) * heads * head_dim


def extend_batch(shape: ExtendShape, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: str = "cuda") -> tuple[KVPool, ForwardBatch]:
    """A fresh-engine layout: each sequence's prefix and new tokens in consecutive pool slots."""
    n, new, prefix = shape.sequences, shape.new, shape.prefix
    total = n * (new + prefix)
    pool = KVPool(1, total + 1, kv_heads, head_dim, dtype, device)
    for buf in pool.k_buffers + pool.v_buffers:
        buf.normal_()
    table = (torch.arange(total, device=device) + 1).view(n, new + prefix)
    rows = torch.arange(n, device=device)
    batch = ForwardBatch(
        input_ids=torch.zeros(n * new, dtype=torch.int64, device=device),
        positions=(torch.arange(new, device=device) + prefix).repeat(n),
        out_cache_loc=table[:, prefix:].reshape(-1), req_rows=rows,
        seq_lens=torch.full((n,), new + prefix, device=device), extend_lens=torch.full((n,), new, device=device),
        seq_lens_cpu=[new + prefix] * n, extend_lens_cpu=[new] * n, is_decode=False,
        logits_indices=(rows + 1) * new - 1, req_to_token=table)
    return pool, batch


def launch_configs(dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, warps, stages) to sweep; float32 tiles stay small (shared memory)."""
    if dtype == torch.float32:
        return [(m, nb, w, s) for m, nb, w, s in itertools.product((16, 32), (16, 32), (4,), (1, 2))]
    return list(itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=ExtendShape.parse, nargs="+",
                   default=[ExtendShape(16, 1024), ExtendShape(4, 2048, 2048), ExtendShape(64, 300)])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sweep", action="store_true", help="time every launch config, not only the default")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    if not torch.cuda.is_available():
        raise SystemExit("the extend-attention benchmark needs a CUDA device")
    dtype = parse_dtype(args.dtype)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"heads {args.heads}/{args.kv_heads}  head_dim {args.head_dim}  {dtype}")
    configs: list[tuple[int, int, int, int] | None] = [None] + (launch_configs(dtype) if args.sweep else [])
    for shape in args.shapes:
        time_shape(args, shape, dtype, configs)
        torch.cuda.empty_cache()     # this shape's pool is gone with time_shape's frame


def time_shape(args: argparse.Namespace, shape: ExtendShape, dtype: torch.dtype,
               configs: list[tuple[int, int, int, int] | None]) -> None:
    """Each launch config (None: the kernel's own) on one shape, checked against the torch reference."""
    from rlserve.layers.attention.triton_backend import TritonAttentionBackend

    scale = args.head_dim ** -0.5
    pool, batch = extend_batch(shape, args.kv_heads, args.head_dim, dtype)
    tokens = shape.sequences * shape.new
    q = torch.randn(tokens, args.heads, args.head_dim, dtype=dtype, device="cuda")
    k = torch.randn(tokens, args.kv_heads, args.head_dim, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    ref_backend = TorchAttentionBackend(pool, scale)
    ref_backend.prepare(batch)
    ref = ref_backend.forward(q, k, v, 0, batch).float()
    flops = extend_flops(shape, args.heads, args.head_dim)
    for config in configs:
        backend = TritonAttentionBackend(pool, scale)
        backend.prepare(batch)
        name = "default" if config is None else "M={} N={} w={} s={}".format(*config)
        launch = nullcontext() if config is None else overriding(
            triton_extend, "extend_launch_config", lambda *a, c=config, **k: c)
        try:
            with launch:
                err = (backend.forward(q, k, v, 0, batch).float() - ref).abs().max().item()
                ms = graph_time_ms(lambda b=backend: b.forward(q, k, v, 0, batch))
        except Exception as e:   # e.g. a tile that needs more shared memory than an SM has
            print(f"{str(shape):>14} {name:<22} {type(e).__name__}")
            continue
        print(f"{str(shape):>14} {name:<22} {ms * 1e3:>9.1f} us {flops / ms / 1e9:>7.1f} TFLOP/s "
              f"max err {err:.1e}", flush=True)

if __name__ == "__main__":
    main()
