"""Ray placement (cluster.backend: ray)."""
from __future__ import annotations

from typing import Any


def train_ray(cfg: Any, reward_fn: Any = None, prompts: Any = None, held_out: Any = None) -> list[dict[str, Any]]:
    raise NotImplementedError("cluster.backend=ray is not available in this version")
