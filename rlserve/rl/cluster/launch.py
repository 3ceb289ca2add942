"""`rlserve train` with several trainer ranks or Ray placement: which launcher runs the sharded loop."""
from __future__ import annotations

from typing import Any

from rlserve.rl.config import TrainConfig


def launch(cfg: TrainConfig, reward_fn: Any = None, prompts: Any = None, held_out: Any = None
           ) -> list[dict[str, Any]]:
    if cfg.cluster.backend == "ray":
        from rlserve.rl.cluster.ray import train_ray  # Ray is imported only here
        return train_ray(cfg, reward_fn, prompts, held_out)
    from rlserve.rl.cluster.local import train_local
    return train_local(cfg, reward_fn, prompts, held_out)
