"""The training loop with the policy sharded by FSDP2 over the trainer's ranks (trainer.ranks > 1 or
trainer.fsdp), rollouts on rlserve servers (server mode). Every rank runs this function together:

    rank 0: push the gathered weights → rollout on the servers → rewards → [dynamic sampling]
    broadcast the rollout to every rank
    all:    recompute (samples split over ranks, gathered) → advantages → sharded PPO update
    rank 0: log → [evaluate on the servers] → checkpoint (loop state; every rank writes its shards)

Each push gathers full tensors bucket by bucket (fsdp_sync.push_sharded), so no rank ever holds the
whole model. The servers hold the final policy when the run ends (one last push, version = steps).
The loop state (step, history, data position, LR schedule, RNG) is checkpoint.py's state.pt; the
policy and optimizer are sharded beside it (`<step dir>/model`, torch.distributed.checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlserve.config import Switch
from rlserve.llm import LLM
from rlserve.rl.advantages import compute_advantages
from rlserve.rl.algorithms import dynamic_sampling_keep, kl_estimate, masked_mean
from rlserve.rl.batch import Rollout, TrainBatch
from rlserve.rl.checkpoint import (
    check_resume_config,
    checkpoint_root,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from rlserve.rl.config import RolloutSection, TrainConfig, to_dict
from rlserve.rl.fsdp import init_trainer_mesh, shard_policy
from rlserve.rl.fsdp_checkpoint import load_sharded, save_sharded
from rlserve.rl.fsdp_sync import push_sharded
from rlserve.rl.fsdp_update import sharded_ppo_update, sharded_recompute
from rlserve.rl.models import ValueModel, frozen_reference
from rlserve.rl.prompts import PromptStream, Sample
from rlserve.rl.rewards import RewardFn, invalid_reward_groups
from rlserve.rl.rollout import encode_prompt
from rlserve.rl.update import Critic, truncated_is_weights

MODEL_DIR = "model"        # the sharded policy/critic and optimizers inside a checkpoint's step directory
TRAINER_KV_TOKENS = 16     # the trainer's own engine never generates in the sharded loop


def check_sharded_config(cfg: TrainConfig) -> None:
    """What the sharded loop does not do (yet): colocated rollouts (the engine cannot serve sharded
    parameters), disk weight sync, agentic, over-sampled or asynchronous rollouts."""
    r = cfg.rollout
    if r.backend != "server":
        raise ValueError("trainer.ranks > 1 / trainer.fsdp train a sharded policy: use rollout.backend=server")
    if r.weight_sync == "disk":
        raise ValueError("rollout.weight_sync=disk is not supported with a sharded trainer: use tensor or distributed")
    if r.agent.enabled or r.over_sample > 1 or r.partial or cfg.asynchronous.mode != "off":
        raise ValueError("a sharded trainer runs synchronous single-turn rollouts: turn off rollout.agent, "
                         "rollout.over_sample, rollout.partial and asynchronous.mode")


def latest_sharded_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint with both its loop state and its shards."""
    found = [p for p in list_checkpoints(output_dir) if (p / MODEL_DIR / ".metadata").is_file()]
    return found[-1] if found else None


def _resolve_reward(cfg: TrainConfig, reward_fn: RewardFn | None) -> RewardFn:
    from rlserve.rl.reward_model import reward_model_fn
    from rlserve.rl.rewards import BUILTIN_REWARDS
    if reward_fn is not None:
        return reward_fn
    if cfg.task.reward == "model":
        return reward_model_fn(cfg.task.reward_model)
    if cfg.task.reward not in BUILTIN_REWARDS:
        raise ValueError(f"unknown reward {cfg.task.reward!r}; rewards: {', '.join(BUILTIN_REWARDS)}")
    return BUILTIN_REWARDS[cfg.task.reward]


def _broadcast(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def remote_greedy_accuracy(remote: Any, llm: LLM, rollout: RolloutSection, samples: list[Sample],
                           reward_fn: RewardFn) -> float:
    """Held-out accuracy on the servers: greedy, one completion per prompt, no constraint."""
    encoded = [encode_prompt(llm, s) for s in samples]
    greedy = dataclasses.replace(rollout, group_size=1, temperature=0.0, constraint=None, ignore_eos=False)
    out = remote.generate_rollout(greedy, [i for i, _ in encoded], [f for _, f in encoded], reward_fn, seed=0)
    return float(out.rewards.mean())


def train_sharded(cfg: TrainConfig, reward_fn: RewardFn | None = None, prompts: PromptStream | None = None,
                  held_out: list[Sample] | None = None, rollout: RolloutSection | None = None
                  ) -> list[dict[str, Any]]:
    """Run on every rank of the default process group (created from the torchrun environment when it
    does not exist). `rollout` replaces cfg.rollout for this run only (a placement's server URLs),
    leaving the config that is recorded and checked on resume as given. Returns rank 0's history."""
    from tqdm import tqdm

    from rlserve.rl.train import (
        Timer,
        _data_sources,
        _prompt_text,
        _prompts_digest,
        mismatch_metrics,
        rollout_metrics,
        warmup_scheduler,
    )

    check_sharded_config(cfg)
    run_rollout = rollout or cfg.rollout
    tcfg = cfg.trainer
    mesh = init_trainer_mesh(None if tcfg.backend == "auto" else tcfg.backend)
    rank = dist.get_rank()
    out_dir = Path(cfg.output_dir)
    resume_path: Path | None = None
    state: dict[str, Any] | None = None
    if rank == 0:
        if cfg.resume_from:
            resume_path = Path(cfg.resume_from)
        elif cfg.resume:
            resume_path = latest_sharded_checkpoint(out_dir)
        if resume_path is not None:
            state = load_checkpoint(resume_path)
            check_resume_config(state.get("config"), to_dict(cfg), resume_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    resume_path = _broadcast(resume_path)
    if resume_path is not None and rank != 0:
        state = load_checkpoint(resume_path)      # a shared output_dir: the shards are there too

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision(cfg.trainer.float32_matmul_precision)
    # The engine loads the weights and (rank 0) tokenizes; it never generates: its module becomes the
    # sharded policy, and the servers roll out. So a token-sized KV pool and no CUDA graphs or warm-up
    # (colocated, a server already holds its share of this GPU).
    engine_config = cfg.model.engine.with_options(seed=cfg.seed, memory_saver=Switch.OFF, cuda_graph=False,
                                                  warmup=False, max_total_tokens=TRAINER_KV_TOKENS)
    if mesh.device_type == "cuda":
        engine_config = engine_config.with_options(device=f"cuda:{torch.cuda.current_device()}")
    llm = LLM(config=engine_config)
    llm.release_memory(["kv_cache"])
    policy = llm.engine.model
    push_dtype = next(policy.parameters()).dtype          # the servers' dtype (same engine options)
    reference = frozen_reference(policy) if cfg.kl.coef > 0 else None
    value_model = ValueModel.from_policy(policy) if cfg.algorithm.advantage == "gae" else None
    dtype = getattr(torch, tcfg.param_dtype)
    for module in (policy, reference, value_model):
        if module is not None:
            shard_policy(module, mesh, mixed_precision=tcfg.mixed_precision, cpu_offload=tcfg.cpu_offload,
                         param_dtype=dtype)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = warmup_scheduler(optimizer, cfg.optim.warmup_steps)
    critic, critic_scheduler = None, None
    models: dict[str, torch.nn.Module] = {"policy": policy}
    optimizers: dict[str, torch.optim.Optimizer] = {"policy": optimizer}
    if value_model is not None:
        critic = Critic(value_model, torch.optim.AdamW(value_model.parameters(), lr=cfg.critic.lr,
                                                       weight_decay=cfg.optim.weight_decay))
        critic_scheduler = warmup_scheduler(critic.optimizer, cfg.optim.warmup_steps)
        models["critic"], optimizers["critic"] = value_model, critic.optimizer
    loop_rng = random.Random(cfg.seed)
    next_step, history = 0, []
    if rank == 0:
        reward_fn = _resolve_reward(cfg, reward_fn)
        if prompts is None:
            prompts, default_held_out = _data_sources(cfg)
            held_out = default_held_out if held_out is None else held_out
    if state is not None:
        assert resume_path is not None
        load_sharded(resume_path / MODEL_DIR, models, optimizers)
        scheduler.load_state_dict(state["scheduler"])
        if critic_scheduler is not None:
            critic_scheduler.load_state_dict(state["critic_scheduler"])
        restore_rng_state(state["rng"], loop_rng, None)
        next_step, history = state["next_step"], state["history"]
        if prompts is not None:
            prompts.seek(state["data_consumed"])
        if rank == 0:
            tqdm.write(f"resumed from {resume_path} at step {next_step}")

    remote = log = None
    if rank == 0:
        from rlserve.rl.metrics_log import MetricLog
        from rlserve.rl.remote import RemoteRollout
        log = MetricLog(out_dir, cfg.logging, history)
        remote = RemoteRollout.start(run_rollout, cfg.model.engine.with_options(seed=cfg.seed), out_dir,
                                     llm.engine.device)
    pushed: int | None = None

    def push(version: int) -> None:
        nonlocal pushed
        if pushed != version:                       # the same on every rank: all gather or none does
            push_sharded(remote, policy, version, push_dtype)
            pushed = version
    try:
        for step in range(next_step, cfg.steps):
            timer = Timer()
            with timer("total_s"):
                seed = loop_rng.randrange(2**31)
                with timer("push_s"):
                    push(step)
                payload: tuple[Rollout, dict[str, Any]] | None = None
                if rank == 0:
                    assert remote is not None and prompts is not None and reward_fn is not None
                    payload = _rank0_rollout(cfg, run_rollout, llm, remote, prompts, reward_fn, seed, step, timer,
                                             _prompt_text, _prompts_digest, rollout_metrics)
                roll, record = _broadcast(payload)
                if roll.num_groups > 0:
                    with timer("logprob_s"):
                        old_logp, ref_logp, values = sharded_recompute(
                            policy, reference, value_model, roll.prompt_ids, roll.completion_ids, cfg,
                            roll.mask.shape[1])
                    record |= mismatch_metrics(roll.engine_logprobs, old_logp, roll.mask)
                    batch, extra = _train_batch(cfg, roll, old_logp, ref_logp, values)
                    record |= extra
                    with timer("update_s"):
                        generator = torch.Generator().manual_seed(seed)
                        record |= sharded_ppo_update(policy, optimizer, batch, cfg, generator, critic)
                    record["lr"] = scheduler.get_last_lr()[0]
                    scheduler.step()
                    if critic_scheduler is not None:
                        critic_scheduler.step()
                if cfg.task.eval_every and (step + 1) % cfg.task.eval_every == 0 and _broadcast(bool(held_out)):
                    with timer("eval_s"):
                        push(step + 1)
                        if rank == 0:
                            assert reward_fn is not None
                            record["eval_accuracy"] = remote_greedy_accuracy(remote, llm, run_rollout,
                                                                             held_out or [], reward_fn)
            record |= timer.seconds
            history.append(record)
            if log is not None:
                log.log(record)
                tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()
                                       if k in ("step", "reward", "eval_accuracy", "grad_norm")}))
            if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                _checkpoint(cfg, step, history, prompts, scheduler, critic_scheduler, loop_rng, models, optimizers)
        push(cfg.steps)           # the servers end with the trained policy
    finally:
        if log is not None:
            log.close()
        if remote is not None:
            remote.close()
    return history if rank == 0 else []


def _rank0_rollout(cfg: TrainConfig, rollout_cfg: RolloutSection, llm: LLM, remote: Any, prompts: PromptStream,
                   reward_fn: RewardFn, seed: int, step: int, timer: Any, prompt_text: Any, digest: Any,
                   metrics: Any) -> tuple[Rollout, dict[str, Any]]:
    """Steps 1–4 of the loop on rank 0: prompts, rollout on the servers, rewards, the filters."""
    from functools import partial
    encoded = [encode_prompt(llm, s) for s in prompts.take(cfg.task.prompts_per_step)]
    ids, fields = [i for i, _ in encoded], [f for _, f in encoded]
    with timer("rollout_s"):
        roll = remote.generate_rollout(rollout_cfg, ids, fields, reward_fn, seed)
    if rollout_cfg.server_offload:
        with timer("offload_s"):
            remote.release_memory()
    keep = invalid_reward_groups(roll.rewards, roll.group_size, partial(prompt_text, llm, roll.prompt_ids),
                                 cfg.task.on_invalid_reward)
    if keep is not None:
        roll = roll.keep_groups(keep)
    record: dict[str, Any] = {"step": step, "prompts_sha1": digest(ids),
                              **(metrics(roll) if len(roll.rewards) else {})}
    if keep is not None:
        record["groups_invalid_reward"] = int((~keep).sum())
    if cfg.algorithm.dynamic_sampling:
        roll = roll.keep_groups(dynamic_sampling_keep(roll.rewards, roll.group_size))
    record["groups_kept"] = roll.num_groups
    # only what the other ranks train on travels
    return dataclasses.replace(roll, completion_texts=[""] * len(roll.completion_ids)), record


def _train_batch(cfg: TrainConfig, roll: Rollout, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                 values: torch.Tensor | None) -> tuple[TrainBatch, dict[str, float]]:
    """Steps 5–6 (the same on every rank): KL, advantages, TIS weights → the step's batch."""
    algo, record = cfg.algorithm, {}
    kl_penalty = None
    if ref_logp is not None:
        kl_tokens = kl_estimate(old_logp, ref_logp, cfg.kl.estimator, algo.log_ratio_clamp, algo.k3_clamp)
        record["kl_ref"] = masked_mean(kl_tokens, roll.mask).item()
        if cfg.kl.mode == "reward":
            kl_penalty = cfg.kl.coef * kl_tokens
    advantages, returns = compute_advantages(algo, roll.rewards, roll.mask, roll.group_size, kl_penalty, values)
    tis = None
    if algo.tis_cap:
        tis = truncated_is_weights(old_logp, roll.engine_logprobs, roll.mask, algo.tis_cap)
        record["tis_weight_mean"] = masked_mean(tis, roll.mask).item()
    return TrainBatch(roll.prompt_ids, roll.completion_ids, roll.mask, old_logp, advantages, ref_logp, values,
                      returns, tis), record


def _checkpoint(cfg: TrainConfig, step: int, history: list[dict[str, Any]], prompts: PromptStream | None,
                scheduler: Any, critic_scheduler: Any, loop_rng: random.Random,
                models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Rank 0 writes the loop state (checkpoint.py), then every rank its shards beside it."""
    step_dir = checkpoint_root(cfg.output_dir) / f"step_{step:06d}"
    if dist.get_rank() == 0:
        assert prompts is not None
        state = {"next_step": step + 1, "config": to_dict(cfg), "history": history,
                 "data_consumed": prompts.consumed, "scheduler": scheduler.state_dict(),
                 "rng": rng_state(loop_rng, None)}
        if critic_scheduler is not None:
            state["critic_scheduler"] = critic_scheduler.state_dict()
        # keep one more: the newest step directory has no shards until they are written below
        save_checkpoint(cfg.output_dir, step, state, keep=cfg.checkpoint_keep + 1 if cfg.checkpoint_keep else 0)
    dist.barrier()
    save_sharded(step_dir / MODEL_DIR, models, optimizers)
