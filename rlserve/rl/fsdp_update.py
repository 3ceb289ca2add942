"""The policy (and critic) update and the logprob recompute with the batch split over FSDP ranks.

Every rank holds the whole step's batch (rank 0 broadcasts it) and draws the same minibatch order; of
each minibatch, rank r takes rows r, r + world, ... and splits them into micro-batches. Each micro-batch's
loss is weighted by its share of the *whole minibatch* (tokens for a token-mean loss, samples otherwise,
as update.micro_batches does within one process), and multiplied by the world size because FSDP averages
gradients over ranks: the reduced gradient is the one-process gradient of the whole minibatch, whatever
the split. Every rank runs the same number of forward/backward passes (each one gathers parameters, a
collective) over the same number of samples: a rank short of rows pads with copies of a real row whose
mask is zero, which adds exactly nothing.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from rlserve.models.llama import LlamaForCausalLM
from rlserve.rl.algorithms import value_loss
from rlserve.rl.batch import TrainBatch, pad
from rlserve.rl.config import TrainConfig
from rlserve.rl.fsdp import clip_grad_norm
from rlserve.rl.logprobs import completion_logprobs
from rlserve.rl.models import ValueModel
from rlserve.rl.update import Critic, _policy_loss, batch_device, minibatches


def rank_chunks(rows: list[int], rank: int, world: int, micro: int) -> list[tuple[list[int], int]]:
    """This rank's micro-batches of `rows` as (rows, how many of them are real). Chunk i has the same
    length on every rank, so every rank runs the same passes over the same number of samples (the
    model's forward methods, each an FSDP collective, run once per sample); a rank short of rows pads
    with copies of rows[0], which the caller must weigh 0."""
    per_rank = math.ceil(len(rows) / world)
    size = micro or per_rank
    mine = rows[rank::world]
    out = []
    for start in range(0, per_rank, size):
        length = min(size, per_rank - start)      # rank 0's chunk: it holds the most rows
        real = mine[start:start + length]
        out.append((real + [rows[0]] * (length - len(real)), len(real)))
    return out


def _reduced(sums: dict[str, float]) -> dict[str, float]:
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def sharded_recompute(policy: LlamaForCausalLM, reference: LlamaForCausalLM | None, critic: ValueModel | None,
                      prompts: list[list[int]], completions: list[list[int]], cfg: TrainConfig, width: int,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """recompute() of the loop with the samples split over the ranks, then gathered: old logprobs,
    reference logprobs and values for every sample, on every rank (CPU)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = len(prompts)
    chunk = cfg.algorithm.logprob_chunk or math.ceil(n / world)
    mine: dict[int, list[torch.Tensor | None]] = {}
    for rows, real in rank_chunks(list(range(n)), rank, world, chunk):
        p, c = [prompts[i] for i in rows], [completions[i] for i in rows]
        old = completion_logprobs(policy, p, c, cfg.rollout.temperature)
        ref = completion_logprobs(reference, p, c, cfg.rollout.temperature) if reference is not None else None
        values = critic(p, c) if critic is not None else None
        for j, i in enumerate(rows[:real]):
            mine[i] = [t[j].float().cpu() if t is not None else None for t in (old, ref, values)]
    parts: list[dict[int, list[torch.Tensor | None]] | None] = [None] * world
    dist.all_gather_object(parts, mine)
    merged: dict[int, list[torch.Tensor | None]] = {}
    for part in parts:
        assert part is not None
        merged |= part

    def column(k: int) -> torch.Tensor | None:
        rows = [merged[i][k] for i in range(n)]
        return None if rows[0] is None else pad([r for r in rows if r is not None], width)
    old_t = column(0)
    assert old_t is not None
    return old_t, column(1), column(2)


def sharded_ppo_update(policy: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: TrainBatch,
                       cfg: TrainConfig, generator: torch.Generator, critic: Critic | None = None
                       ) -> dict[str, float]:
    """update.ppo_update over the ranks: the same minibatches, optimizer steps and (reduced) metrics."""
    algo = cfg.algorithm
    width = batch.mask.shape[1]
    sums: dict[str, float] = defaultdict(float)
    updates = 0
    for _ in range(algo.ppo_epochs):
        for rows in minibatches(len(batch), algo.minibatch_size, generator):
            for key, value in _policy_step(policy, optimizer, batch, rows, cfg, width).items():
                sums[key] += value
            if critic is not None:
                for key, value in _critic_step(critic, batch, rows, cfg, width).items():
                    sums[key] += value
            updates += 1
    return {key: value / updates for key, value in sums.items()} | {"optimizer_steps": updates}


def _shares(batch: TrainBatch, rows: list[int], by_tokens: bool, micro: int
            ) -> list[tuple[TrainBatch, float, float]]:
    """This rank's micro-batches of minibatch `rows`: (chunk, loss weight, metrics weight). Padding rows
    get a zero mask, so they add nothing to a token-mean loss; a per-sequence loss still counts them in
    its mean over the chunk's sequences, so its weight is the padded chunk's share of the minibatch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    total = batch.mask[rows].sum().clamp_min(1.0).item() if by_tokens else float(len(rows))
    out = []
    for chunk_rows, real in rank_chunks(rows, rank, world, micro):
        chunk = batch.select(chunk_rows)
        chunk.mask = chunk.mask.clone()
        chunk.mask[real:] = 0
        if by_tokens:
            share = chunk.mask.sum().item() / total
            out.append((chunk, share, share))
        else:
            out.append((chunk, len(chunk_rows) / total, real / total))
    return out


def _step(module: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, out: dict[str, float],
          norm_key: str) -> dict[str, float]:
    reduced = _reduced(out)
    reduced[norm_key] = clip_grad_norm(module, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return reduced


def _policy_step(policy: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: TrainBatch, rows: list[int],
                 cfg: TrainConfig, width: int) -> dict[str, float]:
    world = dist.get_world_size()
    out: dict[str, float] = defaultdict(float)
    optimizer.zero_grad(set_to_none=True)
    by_tokens = cfg.algorithm.loss_agg == "token-mean"
    for chunk, share, weight in _shares(batch, rows, by_tokens, cfg.algorithm.micro_batch_size):
        loss, metrics = _policy_loss(policy, chunk, cfg, width)
        (loss * (share * world)).backward()
        for key, value in metrics.items():
            out[key] += weight * value
    return _step(policy, optimizer, cfg.optim.max_grad_norm, out, "grad_norm")


def _critic_step(critic: Critic, batch: TrainBatch, rows: list[int], cfg: TrainConfig, width: int
                 ) -> dict[str, float]:
    world = dist.get_world_size()
    device = batch_device(critic.model)
    out: dict[str, float] = defaultdict(float)
    critic.optimizer.zero_grad(set_to_none=True)
    for chunk, share, _ in _shares(batch, rows, True, cfg.algorithm.micro_batch_size):
        values = pad(critic.model(chunk.prompt_ids, chunk.completion_ids), width)
        assert chunk.old_values is not None and chunk.returns is not None
        loss = value_loss(values, chunk.old_values.to(device), chunk.returns.to(device), chunk.mask.to(device),
                          clip=cfg.critic.value_clip)
        (loss * (share * world)).backward()
        out["value_loss"] += share * loss.item()
    return _step(critic.model, critic.optimizer, cfg.optim.max_grad_norm, out, "critic_grad_norm")
