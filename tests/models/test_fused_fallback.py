"""Fused (torch.compile'd) kernels: used for inference calls only, eager under autograd, and eager for
good when dynamo can't compile a call, without failing the forward pass."""
from __future__ import annotations

import torch

from rlserve.layers.fused import _Fused


def test_autograd_calls_take_the_eager_function():
    calls = []

    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * 2

    fused = _Fused(double)
    x = torch.ones(3, requires_grad=True)
    y = fused(x)                  # grad enabled: eager, and gradients flow
    y.sum().backward()
    assert len(calls) == 1 and torch.equal(x.grad, torch.full((3,), 2.0))


def test_a_function_dynamo_cannot_compile_falls_back_to_eager():
    def data_dependent(x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:    # a graph break: fullgraph compilation refuses it
            return x + 1
        return x - 1

    fused = _Fused(data_dependent)
    with torch.inference_mode():
        assert torch.equal(fused(torch.ones(2)), torch.full((2,), 2.0))
        assert fused.failed
        assert torch.equal(fused(-torch.ones(2)), torch.full((2,), -2.0))
