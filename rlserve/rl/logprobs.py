"""Trainer-side logprobs: the engine's own model module run as a plain causal LM over packed sequences
(no KV pool), so trainer and rollout compute logprobs with the same code."""
from __future__ import annotations

import torch

from rlserve.models.llama import LlamaForCausalLM


def completion_logprobs(model: LlamaForCausalLM, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float = 1.0) -> list[torch.Tensor]:
    """log p(completion token | everything before it), one tensor per sample, with gradients if enabled."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    device = next(model.parameters()).device
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    positions = torch.tensor([i for s in seqs for i in range(len(s))], device=device)
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    hidden = model(ids, positions, cu_seqlens=cu)
    out = []
    for (start, _), p, c in zip(zip(cu[:-1], cu[1:]), prompts, completions):
        # Positions predicting the completion: the last prompt token through the second-to-last output.
        h = hidden[start + len(p) - 1:start + len(p) + len(c) - 1]
        logits = model.compute_logits(h) / temperature
        target = torch.tensor(c, device=device)
        out.append(torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1))
    return out
