"""Groups whose samples may be generated over several steps (partial rollouts), with the weight version of
every token, and how the update treats tokens sampled under older weights.

A sample that is aborted before it finishes keeps what it generated (tokens, the engine's logprobs, each
token's weight version). It resumes later as its own request: prompt + its tokens as the prompt, the
remaining token budget as max_tokens, so the continuation is sampled by whatever weights serve then. When
it trains, its tokens from weights older than its newest tokens' are masked out of the loss,
importance-weighted (TIS: min(π_trainer / π_sampler, cap)) or kept (rollout.partial_old_tokens).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlserve.rl.batch import Rollout, pad
from rlserve.rl.rewards import RewardFn, score_batch


def spans_to_versions(spans: Sequence[Sequence[Any]], n: int, default: int) -> list[int]:
    """Per-token versions of `n` tokens from weight_version_spans ((first token, version), ...); no spans:
    all `default`. Versions are the integers the loop names its weights with (the step number)."""
    if not spans:
        return [default] * n
    out: list[int] = []
    for k, (_, version) in enumerate(spans):
        end = spans[k + 1][0] if k + 1 < len(spans) else n
        out += [int(version)] * (min(end, n) - len(out))
    return out + [int(spans[-1][1])] * (n - len(out))


@dataclass
class SampleState:
    """One sample's progress: everything it has generated so far."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None     # None while it may still grow (also after an abort)

    def extend(self, tokens: Sequence[int], logprobs: Sequence[float], versions: Sequence[int], text: str,
               finish_reason: str | None) -> None:
        self.tokens += tokens
        self.logprobs += logprobs
        self.versions += versions
        self.text += text
        self.finish_reason = None if finish_reason == "abort" else finish_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GroupState:
    """A prompt and its group_size samples, as far as they have got."""
    prompt_ids: list[int]
    fields: dict[str, Any]
    samples: list[SampleState]
    aborts: int = 0                      # times the group was aborted before it finished

    @classmethod
    def fresh(cls, prompt_ids: list[int], fields: dict[str, Any], group_size: int) -> GroupState:
        return cls(prompt_ids, fields, [SampleState() for _ in range(group_size)])

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    @property
    def started(self) -> bool:
        return any(s.tokens for s in self.samples)

    @property
    def oldest_version(self) -> int | None:
        return min((min(s.versions) for s in self.samples if s.versions), default=None)

    def generated_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.samples)

    def restart(self) -> GroupState:
        """The same prompt with no progress (aborted without partial rollouts)."""
        return GroupState(self.prompt_ids, self.fields, [SampleState() for _ in self.samples], self.aborts)


def build_rollout(groups: list[GroupState], group_size: int, reward_fn: RewardFn) -> Rollout:
    """Finished groups as one Rollout (rewards scored here), with every token's weight version."""
    samples = [(g, s) for g in groups for s in g.samples]
    completions = [s.tokens for _, s in samples]
    texts = [s.text for _, s in samples]
    # token-id prompts carry no text, as in rollout.generate_rollout
    rewards = torch.tensor(score_batch(reward_fn, [""] * len(samples), texts, [g.fields for g, _ in samples]),
                           dtype=torch.float32)
    mask = pad([torch.ones(len(c)) for c in completions])
    width = mask.shape[1]
    return Rollout([g.prompt_ids for g, _ in samples], [list(c) for c in completions], texts,
                   pad([torch.tensor(s.logprobs, dtype=torch.float32) for _, s in samples], width), mask, rewards,
                   group_size, pad([torch.tensor(s.versions, dtype=torch.long) for _, s in samples], width))


@torch.no_grad()
def old_token_treatment(rollout: Rollout, trainer_logp: torch.Tensor, version: int, how: str, cap: float
                        ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """(the loss mask, per-token weights or None, metrics). A token is old when its sample has later tokens
    from newer weights (a resumed partial sample's earlier part, or a request that went on across a weight
    push): mask takes old tokens out of the loss; tis weighs them min(π_trainer / π_sampler, cap) (the
    trainer's recompute over the sampler's logprobs), the others 1; keep changes nothing. A sample drawn
    whole under one older version (one step off, asynchronous) is not old here: how stale a sample may be
    is asynchronous.max_staleness's business. `version`: the trainer's, for the staleness metric."""
    mask = rollout.mask
    if rollout.token_versions is None:
        return mask, None, {}
    on = mask.bool()
    versions = rollout.token_versions
    newest = versions.masked_fill(~on, torch.iinfo(versions.dtype).min).amax(-1, keepdim=True)
    old = (versions < newest) & on
    lag = (version - versions).masked_fill(~on, 0)
    metrics = {"tokens_old_version": float(old.sum()), "token_staleness_max": float(lag.max()) if lag.numel() else 0.0}
    if how == "mask":
        return mask * ~old, None, metrics
    if how == "tis":
        ratio = torch.exp(trainer_logp - rollout.engine_logprobs).clamp(max=cap)
        weights = torch.where(old, ratio, torch.ones_like(ratio)) * mask
        if old.any():
            metrics["old_token_tis_mean"] = float(weights[old].mean())
        return mask, weights, metrics
    return mask, None, metrics
