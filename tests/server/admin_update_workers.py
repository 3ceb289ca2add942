"""Child-process bodies for tests/server/test_admin_updates.py (spawned, so they live in an importable module)."""
from __future__ import annotations

import os
from typing import Any

import torch

# (name, shape, dtype) of the tiny model's tensors that the dying trainer announces: mixed dtypes.
SPECS: list[tuple[str, tuple[int, ...], torch.dtype]] = [
    ("model.layers.0.mlp.down_proj.weight", (64, 128), torch.float32),
    ("model.norm.weight", (64,), torch.bfloat16),
    ("model.layers.1.mlp.up_proj.weight", (128, 64), torch.float32),
]


def update_pairs(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(name, torch.randn(shape, generator=g).to(dtype)) for name, shape, dtype in SPECS]


def dying_trainer(port: int, seed: int, go: Any) -> None:
    """Rank 0 of a gloo weight-update group: joins, waits until the update is announced, broadcasts the
    first of its one-tensor buckets (bucket_bytes=1) and dies before the others."""
    from rlserve.weight_sync import WeightSender

    sender = WeightSender("127.0.0.1", port, world_size=2, backend="gloo", timeout_s=60)
    sender.init_group()
    go.wait(120)
    sender.broadcast(update_pairs(seed)[:1], bucket_bytes=1)
    os._exit(3)
