"""Decode GEMM micro-benchmark: a model's per-layer products at decode batch sizes, cuBLAS (F.linear)
against the Triton decode GEMM (layers/skinny_gemm.py).

    python -m rlserve.bench.decode_gemm [--model qwen3-0.6b] [--rows 1 16 64 128 256] [--sweep]

One "layer" is the four products of a decoder layer as the engine runs them (q/k/v stacked, o,
gate/up stacked, down). Every layer gets its own weights, so a pass over all layers streams the
model's weights from HBM as a decode step does (they do not fit in L2); the pass is captured in a
CUDA graph and replayed, so the figures are device time without launch gaps. TB/s is weight bytes
over that time. Each Triton launch is checked against cuBLAS's output.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from rlserve.bench.attention import graph_time_ms
from rlserve.config import parse_dtype
from rlserve.layers import skinny_gemm as sg
from rlserve.models.presets import preset_hf_config


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each product of one decoder layer, projections stacked as the engine stacks them."""
    cfg = preset_hf_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim
    return {"qkv": (qkv, cfg.hidden_size), "o": (cfg.hidden_size, cfg.num_attention_heads * head_dim),
            "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
            "down": (cfg.hidden_size, cfg.intermediate_size)}


def sweep_launches() -> list[sg.GemmLaunch]:
    return ([sg.GemmLaunch(bn, bk, 4, s, t) for bn, bk, s, t in itertools.product(
        (16, 32, 64), (64, 128, 256), (3, 4), (128, 256))]
        + [sg.GemmLaunch(64, bk, 8, 3, t) for bk in (64, 128) for t in (128, 256)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64, 128, 192, 256])
    p.add_argument("--layers", type=int, default=0, help="layers of distinct weights (default: the model's)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sweep", action="store_true", help="time every launch of sweep_launches() too")
    p.add_argument("--top", type=int, default=5, help="launches shown per row count with --sweep")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_gemm needs a CUDA device")
    dtype = parse_dtype(args.dtype)
    shapes = layer_shapes(args.model)
    layers = args.layers or preset_hf_config(args.model).num_hidden_layers
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * k ** -0.5
                      for _ in range(layers)] for name, (n, k) in shapes.items()}
    layer_bytes = sum(n * k for n, k in shapes.values()) * weights["o"][0].element_size()
    print(f"{args.model}: {layers} layers, {layer_bytes / 1e6:.1f} MB of weights a layer; "
          f"µs a layer (the four products), graph-timed")

    def time_layer(rows: int, gemm) -> tuple[float, float]:
        xs = {name: torch.randn(rows, k, device="cuda", dtype=dtype, generator=gen) for name, (n, k) in shapes.items()}
        for name, (n, k) in shapes.items():
            sg.reserve(sg.MAX_ROWS, n, k, xs[name].device)
        err = max((gemm(xs[name], weights[name][0]).float() - F.linear(xs[name], weights[name][0]).float())
                  .abs().max().item() for name in shapes)

        def step() -> None:
            for i in range(layers):
                for name in shapes:
                    gemm(xs[name], weights[name][i])
        return graph_time_ms(step, calls=1) * 1000 / layers, err

    for rows in args.rows:
        base, _ = time_layer(rows, F.linear)
        line = f"rows {rows:4d}: cuBLAS {base:6.1f} µs ({layer_bytes / base / 1e6:.2f} TB/s)"
        if rows <= sg.MAX_ROWS:
            ours, err = time_layer(rows, sg.skinny_linear)
            line += f" | triton {ours:6.1f} µs ({layer_bytes / ours / 1e6:.2f} TB/s, max |Δ| {err:.2g})"
        print(line, flush=True)
        if args.sweep and rows <= sg.MAX_ROWS:
            results = []
            for launch in sweep_launches():
                try:
                    us, err = time_layer(rows, lambda x, w, launch=launch: sg.skinny_linear(x, w, launch=launch))
                except Exception as e:   # noqa: BLE001 - a launch that does not fit (shared memory) is skipped
                    print(f"    {launch}: {type(e).__name__}")
                    continue
                results.append((us, err, launch))
            for us, err, launch in sorted(results, key=lambda r: r[0])[:args.top]:
                print(f"    {us:6.1f} µs  max |Δ| {err:.2g}  {launch}")


if __name__ == "__main__":
    main()
