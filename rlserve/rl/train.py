"""The colocated training loop, top to bottom: prompts → rollout → rewards → advantages → update →
(the engine serves the updated module directly) → log → evaluate. `rlserve train --config x.yaml k=v`."""
from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from rlserve.llm import LLM
from rlserve.rl.config import TrainConfig, to_dict
from rlserve.rl.grpo import grpo_step
from rlserve.rl.rewards import BUILTIN_REWARDS, score_batch
from rlserve.rl.tasks import TASKS
from rlserve.sampling import SamplingParams


def _encode(llm: LLM, sample: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    prompt = sample["prompt"]
    text = llm.apply_chat_template(prompt) if isinstance(prompt, list) else prompt
    fields = {k: v for k, v in sample.items() if k != "prompt"}
    return llm.encode(text)[1], fields


def evaluate(llm: LLM, cfg: TrainConfig, samples: list[dict[str, Any]]) -> float:
    """Greedy accuracy (mean reward) on held-out samples."""
    reward = BUILTIN_REWARDS[cfg.task.reward]
    encoded = [_encode(llm, s) for s in samples]
    outs = llm.generate([ids for ids, _ in encoded], SamplingParams(temperature=0, max_tokens=cfg.rollout.max_tokens),
                        use_tqdm=False)
    scores = score_batch(reward, [o.prompt or "" for o in outs], [o.outputs[0].text for o in outs],
                         [f for _, f in encoded])
    return sum(scores) / len(scores)


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    llm = LLM(cfg.model.path, dtype=cfg.model.dtype, seed=cfg.seed, max_total_tokens=cfg.model.max_total_tokens)
    model = llm.engine.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    if cfg.task.name not in TASKS or cfg.task.reward not in BUILTIN_REWARDS:
        raise ValueError(f"unknown task {cfg.task.name!r} or reward {cfg.task.reward!r}")
    task = TASKS[cfg.task.name]
    train_samples = task("train", seed=cfg.seed)
    held_out = list(itertools.islice(task("test", seed=cfg.seed), cfg.task.eval_prompts))
    reward = BUILTIN_REWARDS[cfg.task.reward]
    history: list[dict[str, Any]] = []
    rng = random.Random(cfg.seed)
    with open(out_dir / "metrics.jsonl", "a") as log:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            batch = [_encode(llm, s) for s in itertools.islice(train_samples, cfg.task.prompts_per_step)]
            stats = grpo_step(llm, optimizer, cfg.rollout, [ids for ids, _ in batch], reward,
                              [f for _, f in batch], seed=rng.randrange(2**31))
            record: dict[str, Any] = {"step": step, "reward": stats.reward_mean, "loss": stats.loss,
                                      "clip_fraction": stats.clip_fraction,
                                      "logprob_mismatch": stats.logprob_mismatch,
                                      "step_seconds": time.perf_counter() - t0}
            if cfg.task.eval_every and (step + 1) % cfg.task.eval_every == 0:
                record["eval_accuracy"] = evaluate(llm, cfg, held_out)
            log.write(json.dumps(record) + "\n")
            log.flush()
            history.append(record)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
    return history


def main(config: str | None, overrides: list[str]) -> int:
    from rlserve.rl.config import load_config
    train(load_config(config, overrides))
    return 0
