"""The trainer's extra models, each a plain nn.Module around our LlamaForCausalLM so that a sharding
wrapper (FSDP2's fully_shard per decoder layer, then the root) can wrap them like the policy:
- a frozen reference policy (the initial weights) for the KL term;
- a value model for PPO: a separate trunk initialised from the policy plus a Linear(hidden, 1) head.
"""
from __future__ import annotations

import torch
from torch import nn

from rlserve.models.llama import LlamaForCausalLM
from rlserve.rl.logprobs import completion_hidden


def clone_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A separate copy with the same weights, device and dtype. Built fresh rather than deep-copied:
    the served module holds a reference to the engine's attention backend (and so the KV pool)."""
    param = next(model.parameters())
    with torch.device(param.device):
        copy = LlamaForCausalLM(model.config)
    copy.to(param.dtype).load_state_dict(model.state_dict())
    return copy


def frozen_reference(policy: LlamaForCausalLM) -> LlamaForCausalLM:
    ref = clone_model(policy).eval()
    ref.requires_grad_(False)
    return ref


class ValueModel(nn.Module):
    """V(prefix) for every completion position: trunk hidden state → value head."""

    def __init__(self, trunk: LlamaForCausalLM) -> None:
        super().__init__()
        self.trunk = trunk
        # The language-model head is never used for values; dropping it (when untied) saves its memory.
        if not trunk.config.tie_word_embeddings:
            trunk.lm_head = nn.Identity()  # type: ignore[assignment]  # an Identity stands in for the Linear
        param = next(trunk.parameters())
        self.value_head = nn.Linear(trunk.config.hidden_size, 1, device=param.device, dtype=param.dtype)
        # Start from V ≡ 0: the first advantages are the plain returns, not noise from a random head.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy: LlamaForCausalLM) -> ValueModel:
        return cls(clone_model(policy))

    def forward(self, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
        """One value per completion token (the value of the state that token is sampled from)."""
        return [self.value_head(h).squeeze(-1).float() for h in completion_hidden(self.trunk, prompts, completions)]
