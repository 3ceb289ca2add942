"""Trainer-side logprobs: the engine's own model module run as a plain causal LM over packed sequences
(no KV pool), so trainer and rollout compute logprobs with the same code."""
from __future__ import annotations

import torch

from rlserve.models.llama import LlamaForCausalLM


def completion_hidden(model: LlamaForCausalLM, prompts: list[list[int]], completions: list[list[int]]
                      ) -> list[torch.Tensor]:
    """Per sample, the hidden states [len(completion), hidden] of the positions that predict its
    completion tokens: the last prompt token through the second-to-last completion token."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    device = next(model.parameters()).device
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    positions = torch.tensor([i for s in seqs for i in range(len(s))], device=device)
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    hidden = model(ids, positions, cu_seqlens=cu)
    return [hidden[start + len(p) - 1:start + len(p) + len(c) - 1]
            for start, p, c in zip(cu[:-1], prompts, completions)]


def completion_logprobs(model: LlamaForCausalLM, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float = 1.0) -> list[torch.Tensor]:
    """log p(completion token | everything before it), one tensor per sample, with gradients if enabled."""
    return completion_logprobs_entropy(model, prompts, completions, temperature, with_entropy=False)[0]


# Rows of a logits chunk: at most this many float32 logits at once (1 GiB), so a recompute without
# gradients over a whole step's tokens never holds [tokens, vocab] in one piece.
LOGITS_CHUNK_ELEMENTS = 1 << 28


def completion_logprobs_entropy(model: LlamaForCausalLM, prompts: list[list[int]], completions: list[list[int]],
                                temperature: float = 1.0, with_entropy: bool = True
                                ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Sampled-token logprobs and (optionally) the entropy of the sampling distribution, per sample.
    Both come from one log-softmax, so the entropy costs one extra elementwise pass over the vocabulary.
    The samples' positions go through lm_head and the log-softmax together, in chunks of rows bounded by
    LOGITS_CHUNK_ELEMENTS: a few launches per micro-batch instead of a few per sample (on a GPU the
    per-sample loop was launch-bound)."""
    if not completions:
        return [], ([] if with_entropy else None)
    device = next(model.parameters()).device
    hidden = torch.cat(completion_hidden(model, prompts, completions))
    target = torch.tensor([t for c in completions for t in c], device=device, dtype=torch.long)
    rows = max(1, LOGITS_CHUNK_ELEMENTS // model.config.vocab_size)
    logp_parts, entropy_parts = [], []
    for start in range(0, hidden.shape[0], rows):
        log_probs = torch.log_softmax(model.compute_logits(hidden[start:start + rows]) / temperature, -1)
        logp_parts.append(log_probs.gather(-1, target[start:start + rows, None]).squeeze(-1))
        if with_entropy:
            entropy_parts.append(-(log_probs.exp() * log_probs).sum(-1))
    lengths = [len(c) for c in completions]
    logps = list(torch.cat(logp_parts).split(lengths)) if logp_parts else [hidden.new_zeros(0)] * len(lengths)
    if not with_entropy:
        return logps, None
    entropies = list(torch.cat(entropy_parts).split(lengths)) if entropy_parts else [hidden.new_zeros(0)] * len(lengths)
    return logps, entropies
