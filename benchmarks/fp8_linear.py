"""One FP8 projection against bf16 on a GPU, by rows: where FP8's time goes (quantizing the activations,
the scaled matmul; "fp8 layer" is Fp8Linear as configured, "tensorwise+epi" the quantization, the
tensor-wise GEMM and its Triton epilogue) at the shapes of a real model, each call replayed from a CUDA
graph as the engine's decode steps are.

    python benchmarks/fp8_linear.py --model llama-3.1-8b --rows 1 16 64 128 256 1024
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rlserve.config import ModelConfig  # noqa: E402
from rlserve.layers.quantized import Fp8Linear, fp8_quantize_rows  # noqa: E402
from rlserve.layers.triton_fp8 import quantize_rows  # noqa: E402
from rlserve.models.loader import resolve_model  # noqa: E402


def graph_us(fn: Callable[[], object], calls: int = 20, replays: int = 20) -> float:
    """Microseconds per call of `fn`, `calls` of them captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def projections(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of a layer's stacked projections."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    return {"qkv": (h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d), "o": (cfg.num_heads * d, h),
            "gate_up": (h, 2 * i), "down": (i, h)}


@torch.inference_mode()      # as the engine runs: the Triton quantization serves only outside autograd
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128, 256, 1024])
    a = ap.parse_args()
    cfg = ModelConfig.from_hf(resolve_model(a.model, "dummy").hf_config)
    print(f"{torch.cuda.get_device_name()}, {a.model}; µs per call (CUDA graph replay)")
    print(f"{'proj':<8} {'rows':>5} {'bf16':>8} {'fp8 torch-quant':>16} {'fp8 layer':>17} "
          f"{'quant torch':>12} {'quant triton':>13} {'scaled_mm':>10} {'tensorwise+epi':>15}")
    totals: dict[int, list[float]] = {}
    for name, (inp, out) in projections(cfg).items():
        w = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) * 0.02
        layer = Fp8Linear(w, None)
        for rows in a.rows:
            x = torch.randn(rows, inp, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_rows(x)

            def scaled() -> torch.Tensor:
                return torch._scaled_mm(xq, layer.qweight.t(), scale_a=xs, scale_b=layer.weight_scale,
                                        out_dtype=torch.bfloat16)

            def torch_quant() -> torch.Tensor:
                q, s = fp8_quantize_rows(x)
                return torch._scaled_mm(q, layer.qweight.t(), scale_a=s, scale_b=layer.weight_scale,
                                        out_dtype=torch.bfloat16)

            def tensorwise() -> torch.Tensor:
                q, s = quantize_rows(x)
                return layer.tensorwise_matmul(q, s)

            row = [graph_us(lambda: F.linear(x, w)), graph_us(torch_quant), graph_us(lambda: layer(x)),
                   graph_us(lambda: fp8_quantize_rows(x)), graph_us(lambda: quantize_rows(x)), graph_us(scaled),
                   graph_us(tensorwise)]
            t = totals.setdefault(rows, [0.0] * len(row))
            for i, v in enumerate(row):
                t[i] += v
            print(f"{name:<8} {rows:>5} " + " ".join(f"{v:>{w_}.1f}" for v, w_ in zip(row, (8, 16, 17, 12, 13, 10, 15))))
    print("a layer (the four projections):")
    for rows, t in totals.items():
        print(f"{'layer':<8} {rows:>5} " + " ".join(f"{v:>{w_}.1f}" for v, w_ in zip(t, (8, 16, 17, 12, 13, 10, 15)))
              + f"   fp8/bf16 {t[0] / t[2]:.2f}x, tensorwise {t[0] / t[6]:.2f}x")


if __name__ == "__main__":
    main()
