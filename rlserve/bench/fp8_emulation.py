"""FP8 weights on a device without FP8 matmuls, for the accuracy report only.

The engine refuses quantization=fp8 off CUDA (there is no kernel to serve with). To measure what FP8
costs in quality on a machine without one, the float model's projections are swapped for the same
Fp8Linear layers the GPU runs (e4m3 weights, one scale per output channel) and each layer's matmul is
replaced by what `torch._scaled_mm` computes: activations quantized to e4m3 per token, products summed
in float32, the result rounded to bfloat16. The GPU test of Fp8Linear checks the kernel against this
same arithmetic (relative error < 1%), so the quality figures carry over.
"""
from __future__ import annotations

import types

import torch

from rlserve.layers.quantized import Fp8Linear, fp8_quantize_rows
from rlserve.models.llama import LlamaForCausalLM


def _scaled_mm_reference(self: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    xq, x_scale = fp8_quantize_rows(flat)
    weight = self.qweight.float() * self.weight_scale.view(-1, 1)
    out = ((xq.float() * x_scale) @ weight.t()).to(torch.bfloat16)
    return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def emulate_fp8(model: LlamaForCausalLM) -> int:
    """Quantize the model's projections to FP8 in place (as quantization=fp8 does on a GPU) with the
    float32 reference matmul; returns how many FP8 layers run."""
    from rlserve.models.quantize import quantize_model
    quantize_model(model, "fp8")
    model.stack_projections()              # the fused q/k/v and gate/up layers, as the engine builds them
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.matmul = types.MethodType(_scaled_mm_reference, layer)  # type: ignore[method-assign]
    return len(layers)
