"""One step's samples as padded token tensors: what the rollout produced and what the update reads.

Samples of one prompt sit next to each other (group by group), so group-wise estimators can reshape
[N] → [groups, group_size]. Token tensors are [N, T] with T the step's longest completion and a mask
that is 1 on completion tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


def pad(rows: list[torch.Tensor], width: int | None = None) -> torch.Tensor:
    """Stack 1-D tensors into [N, width], zero-padded on the right."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.zeros(len(rows), width, dtype=rows[0].dtype if rows else torch.float32,
                      device=rows[0].device if rows else None)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


@dataclass
class Rollout:
    """n completions per prompt from the engine, with their rewards."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_texts: list[str]
    engine_logprobs: torch.Tensor        # [N, T] the engine's logprobs of the tokens it sampled
    mask: torch.Tensor                   # [N, T]
    rewards: torch.Tensor                # [N]
    group_size: int
    # [N, T] the weight version that sampled each token (partial and asynchronous rollouts); None: all
    # tokens from the weights being trained
    token_versions: torch.Tensor | None = None
    # what the rollout itself reports for the step's metrics (agentic rollouts: turns, tool calls, statuses)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len(self.prompt_ids) // self.group_size

    def keep_groups(self, keep: torch.Tensor) -> Rollout:
        """The rollout restricted to the groups where `keep` [num_groups] is True."""
        rows = keep.repeat_interleave(self.group_size).nonzero().squeeze(-1).tolist()
        return Rollout([self.prompt_ids[i] for i in rows], [self.completion_ids[i] for i in rows],
                       [self.completion_texts[i] for i in rows], self.engine_logprobs[rows], self.mask[rows],
                       self.rewards[rows], self.group_size,
                       None if self.token_versions is None else self.token_versions[rows], dict(self.metrics))


@dataclass
class TrainBatch:
    """Everything the policy (and critic) update needs; constants of the update, no autograd."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    mask: torch.Tensor                   # [N, T]
    old_logprobs: torch.Tensor           # [N, T] the trainer's recompute before the first update
    advantages: torch.Tensor             # [N] or [N, T]
    ref_logprobs: torch.Tensor | None = None   # [N, T] when a reference policy exists
    old_values: torch.Tensor | None = None     # [N, T] PPO with a critic
    returns: torch.Tensor | None = None        # [N, T] PPO with a critic
    tis_weights: torch.Tensor | None = None    # [N, T] truncated importance weights

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, rows: list[int]) -> TrainBatch:
        def pick(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value[rows]
            if isinstance(value, list):
                return [value[i] for i in rows]
            return value
        return TrainBatch(**{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})
