"""`rlserve train`'s entry: the one-process loop (rl/train.py), or several trainer ranks / Ray placement
(rl/cluster, docs/cluster.md). It sits above both so that neither imports the other's dispatcher."""
from __future__ import annotations

from typing import Any

from rlserve.rl.config import TrainConfig


def train(cfg: TrainConfig, reward_fn: Any = None, prompts: Any = None, held_out: Any = None
          ) -> list[dict[str, Any]]:
    """Run cfg.steps steps wherever cfg places the trainer; returns the per-step metrics (rank 0's)."""
    if cfg.trainer.sharded or cfg.cluster.backend == "ray":
        from rlserve.rl.cluster.launch import launch
        return launch(cfg, reward_fn, prompts, held_out)
    from rlserve.rl.train import train as train_one_process
    return train_one_process(cfg, reward_fn, prompts, held_out)


def main(config: str | None, overrides: list[str]) -> int:
    from rlserve.rl.config import load_config
    train(load_config(config, overrides))
    return 0
