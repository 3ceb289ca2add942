"""The policy (and critic) update: several PPO epochs over shuffled minibatches of one step's samples.

Each minibatch is one optimizer step (gradients accumulated over micro-batches of
algorithm.micro_batch_size samples to bound activation memory). Per minibatch the loss is

    clipped surrogate (× TIS weights)  − entropy_coef · entropy  [+ kl.coef · KL(π ‖ π_ref) when kl.mode=loss]

aggregated with the configured loss aggregation; gradients are clipped to optim.max_grad_norm.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from rlserve.models.llama import LlamaForCausalLM
from rlserve.rl.algorithms import aggregate, kl_estimate, masked_mean, policy_loss, value_loss
from rlserve.rl.batch import TrainBatch, pad
from rlserve.rl.config import TrainConfig
from rlserve.rl.logprobs import completion_logprobs_entropy
from rlserve.rl.models import ValueModel


@dataclass
class Critic:
    model: ValueModel
    optimizer: torch.optim.Optimizer


@torch.no_grad()
def truncated_is_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """TIS: w_t = min(π_trainer_old(y_t) / π_engine(y_t), cap) on completion tokens, 0 elsewhere. The
    engine sampled the tokens, the trainer's policy is what the update corrects; the cap bounds the
    variance where the two disagree."""
    return torch.exp(old_logprobs - engine_logprobs).clamp(max=cap) * mask


def minibatches(n: int, size: int, generator: torch.Generator) -> list[list[int]]:
    """A shuffled partition of range(n) into chunks of `size` (0 → one chunk)."""
    order = torch.randperm(n, generator=generator).tolist()
    size = size or n
    return [order[i:i + size] for i in range(0, n, size)]


def ppo_update(policy: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: TrainBatch,
               cfg: TrainConfig, generator: torch.Generator, critic: Critic | None = None) -> dict[str, float]:
    """Run algorithm.ppo_epochs passes; returns metrics averaged over all minibatch steps."""
    algo = cfg.algorithm
    width = batch.mask.shape[1]
    sums: dict[str, float] = defaultdict(float)
    updates = 0
    for _ in range(algo.ppo_epochs):
        for rows in minibatches(len(batch), algo.minibatch_size, generator):
            mb = batch.select(rows)
            for key, value in _policy_step(policy, optimizer, mb, cfg, width).items():
                sums[key] += value
            if critic is not None:
                for key, value in _critic_step(critic, mb, cfg, width).items():
                    sums[key] += value
            updates += 1
    return {key: value / updates for key, value in sums.items()} | {"optimizer_steps": updates}


def micro_batches(mb: TrainBatch, size: int, share_by_tokens: bool) -> list[tuple[TrainBatch, float]]:
    """Split a minibatch for gradient accumulation: (chunk, the chunk's share of the minibatch loss).
    A token-mean loss is shared by tokens, a per-sequence one by sequences, so the weighted sum of the
    chunks' losses equals the whole minibatch's loss."""
    if not size or size >= len(mb):
        return [(mb, 1.0)]
    chunks = [mb.select(list(range(i, min(i + size, len(mb))))) for i in range(0, len(mb), size)]
    if share_by_tokens:
        total = mb.mask.sum().clamp_min(1.0).item()
        return [(c, c.mask.sum().item() / total) for c in chunks]
    return [(c, len(c) / len(mb)) for c in chunks]


def _policy_step(policy: LlamaForCausalLM, optimizer: torch.optim.Optimizer, mb: TrainBatch, cfg: TrainConfig,
                 width: int) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    optimizer.zero_grad(set_to_none=True)
    for chunk, share in micro_batches(mb, cfg.algorithm.micro_batch_size, cfg.algorithm.loss_agg == "token-mean"):
        loss, metrics = _policy_loss(policy, chunk, cfg, width)
        (loss * share).backward()
        for key, value in metrics.items():
            out[key] += share * value
    out["grad_norm"] = _clip(policy.parameters(), cfg.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def _policy_loss(policy: LlamaForCausalLM, mb: TrainBatch, cfg: TrainConfig, width: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    algo, device = cfg.algorithm, batch_device(policy)
    logps, entropies = completion_logprobs_entropy(policy, mb.prompt_ids, mb.completion_ids,
                                                   cfg.rollout.temperature)
    assert entropies is not None             # with_entropy defaults on
    logp, entropy = pad(logps, width), pad(entropies, width)
    mask = mb.mask.to(device)
    loss, metrics = policy_loss(logp, mb.old_logprobs.to(device), mb.advantages.to(device), mask,
                                clip_low=algo.clip_low, clip_high=algo.clip_high, agg=algo.loss_agg,
                                max_len=cfg.rollout.max_tokens,
                                tis_weights=None if mb.tis_weights is None else mb.tis_weights.to(device),
                                log_ratio_clamp=algo.log_ratio_clamp, dual_clip=algo.dual_clip)
    out = {"pg_loss": loss.item(), "clip_fraction": metrics["clip_fraction"],
           "approx_kl_old": metrics["approx_kl"], "entropy": masked_mean(entropy.detach(), mask).item()}
    if "dual_clip_fraction" in metrics:
        out["dual_clip_fraction"] = metrics["dual_clip_fraction"]
    if algo.entropy_coef:
        loss = loss - algo.entropy_coef * aggregate(entropy, mask, algo.loss_agg, cfg.rollout.max_tokens)
    if cfg.kl.coef > 0 and cfg.kl.mode == "loss":
        assert mb.ref_logprobs is not None     # the loop computes them whenever the KL term is on
        kl = aggregate(kl_estimate(logp, mb.ref_logprobs.to(device), cfg.kl.estimator, algo.log_ratio_clamp,
                                   algo.k3_clamp), mask, algo.loss_agg, cfg.rollout.max_tokens)
        loss = loss + cfg.kl.coef * kl
        out["kl_loss"] = kl.item()
    out["loss"] = loss.item()
    return loss, out


def _critic_step(critic: Critic, mb: TrainBatch, cfg: TrainConfig, width: int) -> dict[str, float]:
    device = batch_device(critic.model)
    total = 0.0
    critic.optimizer.zero_grad(set_to_none=True)
    for chunk, share in micro_batches(mb, cfg.algorithm.micro_batch_size, share_by_tokens=True):
        values = pad(critic.model(chunk.prompt_ids, chunk.completion_ids), width)
        assert chunk.old_values is not None and chunk.returns is not None    # set whenever a critic runs
        loss = value_loss(values, chunk.old_values.to(device), chunk.returns.to(device), chunk.mask.to(device),
                          clip=cfg.critic.value_clip)
        (loss * share).backward()
        total += share * loss.item()
    grad_norm = _clip(critic.model.parameters(), cfg.optim.max_grad_norm)
    critic.optimizer.step()
    critic.optimizer.zero_grad(set_to_none=True)
    return {"value_loss": total, "critic_grad_norm": grad_norm}


def _clip(params, max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0


def batch_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
