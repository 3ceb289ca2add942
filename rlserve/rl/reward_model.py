"""Rewards from a reward model: `task.reward: model` with a `task.reward_model` section.

The model (a `*ForSequenceClassification` or `Qwen2ForRewardModel` checkpoint) scores the text
prompt + completion; one of its outputs (`label`) is the score. It runs in this process (`path`: an LLM
whose classify() batches through its engine) or behind a server (`url`: POST /classify, SGLang's native
route, which rlserve serves too). reward = weight * score + rule_weight * rule(prompt, completion), so a
rule-based reward (format, correctness) can be combined with it.
"""
from __future__ import annotations

from typing import Any

from rlserve.rl.config import RewardModelSection
from rlserve.rl.rewards import BUILTIN_REWARDS, RewardFn, score

CLASSIFY_TIMEOUT_S = 600.0


class RewardModel:
    """A reward callable (`await fn(prompt, completion, **fields) -> float`) backed by a reward model."""

    def __init__(self, cfg: RewardModelSection) -> None:
        if (cfg.path is None) == (cfg.url is None):
            raise ValueError("task.reward_model needs path (run it here) or url (a server's /classify)")
        if cfg.rule is not None and cfg.rule not in BUILTIN_REWARDS:
            raise ValueError(f"task.reward_model.rule: unknown reward {cfg.rule!r}; rewards: "
                             f"{', '.join(BUILTIN_REWARDS)}")
        self.cfg = cfg
        self.llm: Any = None
        if cfg.path is not None:
            from rlserve.llm import LLM
            self.llm = LLM(cfg.path, dtype=cfg.dtype)
        self.__name__ = "reward_model"

    async def model_score(self, text: str) -> float:
        """The model's score of one text."""
        if self.llm is not None:
            scores = self.llm.classify(text)[0]
        else:
            import httpx
            async with httpx.AsyncClient(timeout=CLASSIFY_TIMEOUT_S) as client:
                r = await client.post(self.cfg.url.rstrip("/") + "/classify", json={"text": text})  # type: ignore[union-attr]
                if r.status_code != 200:
                    raise RuntimeError(f"reward model server {self.cfg.url}: {r.status_code} {r.text[:300]}")
                scores = r.json()["embedding"]
        if not 0 <= self.cfg.label < len(scores):
            raise ValueError(f"task.reward_model.label={self.cfg.label} but the model has {len(scores)} outputs")
        return float(scores[self.cfg.label])

    async def __call__(self, prompt: str, completion: str, **fields: Any) -> float:
        cfg = self.cfg
        reward = cfg.weight * await self.model_score(prompt + completion)
        if cfg.rule is not None and cfg.rule_weight:
            reward += cfg.rule_weight * await score(BUILTIN_REWARDS[cfg.rule], prompt, completion, fields)
        return reward


def reward_model_fn(cfg: RewardModelSection) -> RewardFn:
    return RewardModel(cfg)
