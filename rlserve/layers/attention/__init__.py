"""Attention backends, chosen by name through a tiny registry."""
from __future__ import annotations

import torch

from rlserve.config import ModelConfig


def create_backend(name: str, pool, cfg: ModelConfig, device: torch.device):
    scale = cfg.head_dim ** -0.5
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        from rlserve.layers.attention.torch_backend import TorchAttentionBackend
        return TorchAttentionBackend(pool, scale)
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("the triton attention backend needs a CUDA device")
        from rlserve.layers.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend(pool, scale, num_heads=cfg.num_heads)
    raise ValueError(f"unknown attention backend {name!r}; choose torch, triton or auto")


def _triton_available() -> bool:
    try:
        from rlserve.layers.attention.triton_backend import HAS_TRITON
    except ImportError:
        return False
    return HAS_TRITON
