from __future__ import annotations

import torch
from torch import nn

from rlserve.layers.fused import EAGER, Kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels: Kernels = EAGER      # its model's set (LlamaForCausalLM.use_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the reference implementation does.
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta): a residual add fused into the norm that follows it."""
        return self.kernels.add_rms_norm(x, delta, self.weight, self.eps)
