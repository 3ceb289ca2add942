"""Several nn.Linear layers over the same input, run as one GEMM at inference.

q/k/v (and gate/up) read the same activations; one matrix product with their weights side by side
launches one kernel instead of three and streams the weights in one pass. The layers keep their
own Parameters (checkpoint names, optimizers and weight sync see no difference): only their storage
moves, into views of one stacked tensor. Training (grad enabled) runs the layers one by one, so
autograd reaches each Parameter; anything that rebinds a Parameter's storage afterwards (`.to()`,
load_state_dict(assign=True)) breaks the sharing, which `intact` notices, and inference falls back
to the layers one by one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StackedLinear:
    def __init__(self, layers: list[nn.Linear]) -> None:
        if not layers:
            raise ValueError("nothing to stack")
        first = layers[0].weight
        if any(l.weight.shape[1] != first.shape[1] or l.weight.dtype != first.dtype
               or l.weight.device != first.device for l in layers):
            raise ValueError("stacked layers need the same input size, dtype and device")
        if len({l.bias is None for l in layers}) != 1:
            raise ValueError("stacked layers must all have a bias or all have none")
        self.layers = layers
        self.sizes = [l.weight.shape[0] for l in layers]
        with torch.no_grad():
            self.weight = torch.cat([l.weight.detach() for l in layers])
            self.bias = None if layers[0].bias is None else torch.cat([l.bias.detach() for l in layers])
        at = 0
        for layer, n in zip(layers, self.sizes):
            layer.weight.data = self.weight[at:at + n]
            if self.bias is not None:
                layer.bias.data = self.bias[at:at + n]
            at += n
        self._ptrs = [l.weight.data_ptr() for l in layers]

    def intact(self) -> bool:
        """Whether every layer's weight still lives where stacking put it."""
        return all(l.weight.data_ptr() == p for l, p in zip(self.layers, self._ptrs))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output, as column slices of one product (views, last dim contiguous)."""
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))


def project(x: torch.Tensor, layers: list[nn.Linear], stacked: StackedLinear | None) -> list[torch.Tensor]:
    """Each layer applied to x: through the stacked GEMM at inference while the sharing holds, else (training,
    nothing stacked, or storage rebound) layer by layer."""
    if stacked is not None and not torch.is_grad_enabled() and stacked.intact():
        return stacked(x)
    return [layer(x) for layer in layers]
