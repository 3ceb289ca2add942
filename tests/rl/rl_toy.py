"""A toy task for training tests: random token-id prompts, rollouts constrained to eight "a"/"b"
characters, reward = the share of "a". A tiny random model starts near 0.5 and can learn it in a few
steps, so the tests see real learning on CPU in seconds."""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlserve.rl.config import TrainConfig, load_config
from rlserve.rl.prompts import PromptStream


def share_of_a(prompt: str, completion: str, **_: Any) -> float:
    return completion.count("a") / 8


def _random_prompts(seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    while True:
        yield {"prompt": [rng.randint(10, 20000) for _ in range(8)]}


def toy_prompts(seed: int = 0) -> PromptStream:
    return PromptStream(generator=lambda: _random_prompts(seed))


def toy_config(model_dir: Path, output_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [f"model.path={model_dir}", f"output_dir={output_dir}", "steps=10",
                              "task.prompts_per_step=4", "task.eval_every=0", "rollout.group_size=8",
                              "rollout.max_tokens=12", 'rollout.constraint={"regex": "[ab]{8}"}',
                              "optim.lr=1e-2", "logging.progress_bar=false", *overrides])


def toy_train(model_dir: Path, output_dir: Path, *overrides: str) -> list[dict[str, Any]]:
    from rlserve.rl.train import train
    cfg = toy_config(model_dir, output_dir, *overrides)
    return train(cfg, reward_fn=share_of_a, prompts=toy_prompts(cfg.seed))
