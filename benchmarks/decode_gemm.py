"""Decode GEMM micro-benchmark: a model's per-layer products at decode batch sizes, through torch's
cuBLAS and cuBLASLt paths.

    python benchmarks/decode_gemm.py [--model qwen3-0.6b] [--rows 1 16 64 128 256]

One "layer" is the four products of a decoder layer as the engine runs them (q/k/v stacked, o,
gate/up stacked, down). Every layer gets its own weights, so a pass over all layers streams the
model's weights from HBM as a decode step does (they do not fit in L2); the pass is captured in a
CUDA graph and replayed, so the figures are device time without launch gaps. TB/s is weight bytes
over that time, to set beside the card's bandwidth.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from rlserve.config import ModelConfig, parse_dtype
from rlserve.models.presets import preset_hf_config

if __package__ in (None, ""):     # run as `python benchmarks/decode_gemm.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import graph_time_ms  # noqa: E402


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each product of one decoder layer, projections stacked as the engine stacks them."""
    cfg = ModelConfig.from_hf(preset_hf_config(model))
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return {"qkv": (qkv, cfg.hidden_size), "o": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
            "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
            "down": (cfg.hidden_size, cfg.intermediate_size)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64, 128, 192, 256])
    p.add_argument("--layers", type=int, default=0, help="layers of distinct weights (default: the model's)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--blas", nargs="+", default=["cublas", "cublaslt"], choices=["cublas", "cublaslt"],
                   help="torch.backends.cuda.preferred_blas_library values to time, in this order")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_gemm needs a CUDA device")
    dtype = parse_dtype(args.dtype)
    shapes = layer_shapes(args.model)
    layers = args.layers or ModelConfig.from_hf(preset_hf_config(args.model)).num_layers
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * k ** -0.5
                      for _ in range(layers)] for name, (n, k) in shapes.items()}
    layer_bytes = sum(n * k for n, k in shapes.values()) * weights["o"][0].element_size()
    print(f"{args.model}: {layers} layers, {layer_bytes / 1e6:.1f} MB of weights a layer; "
          f"µs a layer (the four products), graph-timed")
    for blas in args.blas:
        torch.backends.cuda.preferred_blas_library(blas)
        cells = []
        for rows in args.rows:
            xs = {name: torch.randn(rows, k, device="cuda", dtype=dtype, generator=gen)
                  for name, (n, k) in shapes.items()}

            def step() -> None:
                for i in range(layers):
                    for name in shapes:
                        F.linear(xs[name], weights[name][i])
            us = graph_time_ms(step, calls=1) * 1000 / layers
            cells.append(f"{rows}: {us:.1f} µs ({layer_bytes / us / 1e6:.2f} TB/s)")
        print(f"{blas:9s}" + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
