"""The lm_head GEMM with float32 output for 16-bit models.

The GEMM accumulates in float32 either way; what a bf16 output throws away is the rounding to 8 bits of
mantissa, i.e. steps of 0.125 at a logit of 20. For a trained model (SmolLM2-135M reading English) the
top two logits then tie exactly at ~6% of positions, the tie breaks by token id, and sampling
probabilities are off by up to ±6%. Writing float32 keeps every bit the accumulator has."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def float32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [T, H] @ weight[V, H]ᵀ as float32, without widening the weight where the device can."""
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.linear(hidden, weight)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if hidden.is_cuda and hidden.dim() == 2 and hidden.dtype == weight.dtype and not needs_grad:
        # cuBLAS reads 16-bit operands and writes its float32 accumulator as is.
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    # Elsewhere widen both operands, which is exact: CPUs have no 16-bit-in, float32-out GEMM, and
    # the one CUDA has no derivative (training takes this path; the casts carry the gradients back).
    return F.linear(hidden.float(), weight.float())
