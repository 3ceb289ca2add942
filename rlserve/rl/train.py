"""The colocated training loop, top to bottom:

    prompts → rollout (n per prompt, engine logprobs kept) → rewards → [dynamic sampling] →
    trainer recompute (old logprobs, reference logprobs, values) → advantages → policy (+ critic)
    update over minibatches and epochs → the engine serves the updated module (flush its stale
    prefix cache) → log → evaluate → checkpoint.

The engine's model *is* the policy: the optimizer updates the very parameters the next rollout reads,
so weight sync is a cache flush. `rlserve train --config x.yaml key=value ... [resume=true]`.

With `rollout.backend=server` the rollout (only) runs on rlserve servers instead (rlserve/rl/remote.py):
each step first pushes the policy's weights to them. The in-process engine still tokenizes, evaluates
and holds the policy the optimizer trains; its KV pool is released for the run and taken back only
while it evaluates.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlserve.config import Switch
from rlserve.llm import LLM
from rlserve.models.llama import LlamaForCausalLM
from rlserve.rl.advantages import compute_advantages
from rlserve.rl.agent.rollout import agent_greedy_accuracy
from rlserve.rl.algorithms import dynamic_sampling_keep, kl_estimate, masked_mean
from rlserve.rl.batch import Rollout, TrainBatch, pad
from rlserve.rl.checkpoint import (
    check_resume_config,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from rlserve.rl.config import TrainConfig, to_dict
from rlserve.rl.logprobs import completion_logprobs
from rlserve.rl.metrics_log import MetricLog
from rlserve.rl.models import ValueModel, frozen_reference
from rlserve.rl.partial import old_token_treatment
from rlserve.rl.prompts import PromptStream, Sample
from rlserve.rl.reward_model import reward_model_fn
from rlserve.rl.rewards import BUILTIN_REWARDS, RewardFn, invalid_reward_groups
from rlserve.rl.rollout import greedy_accuracy
from rlserve.rl.sources import make_source
from rlserve.rl.update import Critic, ppo_update, truncated_is_weights

# ----------------------------------------------------------------------------- setup

@dataclass
class Run:
    """Everything the loop reads and changes, which is also everything a checkpoint must hold."""
    cfg: TrainConfig
    llm: LLM
    policy: LlamaForCausalLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    reward_fn: RewardFn
    prompts: PromptStream
    held_out: list[Sample]
    rng: random.Random                   # draws each step's seed
    reference: LlamaForCausalLM | None = None
    critic: Critic | None = None
    critic_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    next_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` train steps, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup_steps) if warmup_steps > 0 else 1.0)


def _data_sources(cfg: TrainConfig) -> tuple[PromptStream, list[Sample]]:
    """The train stream and the held-out samples: from dataset files when configured, else the task."""
    task = cfg.task
    if task.dataset is not None:
        from rlserve.rl.data import load_dataset
        train_stream = PromptStream(items=load_dataset(task.dataset), seed=cfg.seed)
    else:
        from rlserve.rl.tasks import TASKS
        if task.name not in TASKS:
            raise ValueError(f"unknown task {task.name!r}; tasks: {', '.join(TASKS)}")
        train_stream = PromptStream(generator=lambda: TASKS[task.name]("train", seed=cfg.seed, **task.options))
    if task.eval_dataset is not None:
        from rlserve.rl.data import load_dataset
        held_out = load_dataset(task.eval_dataset)[:task.eval_prompts]
    elif task.dataset is not None:
        held_out = []                    # a train file alone has no held-out split
    else:
        from rlserve.rl.tasks import TASKS
        held_out = list(itertools.islice(TASKS[task.name]("test", seed=cfg.seed, **task.options),
                                         task.eval_prompts))
    return train_stream, held_out


def setup(cfg: TrainConfig, reward_fn: RewardFn | None = None, prompts: PromptStream | None = None,
          held_out: list[Sample] | None = None) -> Run:
    """Build the engine (whose module is the policy), optimizers, reference, critic and data.
    `reward_fn`, `prompts` and `held_out` replace the configured task (tests and library use)."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision(cfg.trainer.float32_matmul_precision)
    if reward_fn is None and cfg.task.reward == "model":
        reward_fn = reward_model_fn(cfg.task.reward_model)
    if reward_fn is None:
        if cfg.task.reward not in BUILTIN_REWARDS:
            raise ValueError(f"unknown reward {cfg.task.reward!r}; rewards: {', '.join(BUILTIN_REWARDS)}")
        reward_fn = BUILTIN_REWARDS[cfg.task.reward]
    if prompts is None:
        prompts, default_held_out = _data_sources(cfg)
        held_out = default_held_out if held_out is None else held_out
    engine_config = cfg.model.engine.with_options(seed=cfg.seed)
    if cfg.rollout.backend == "server" and engine_config.memory_saver is not Switch.OFF:
        # The policy's tensors are pushed to the servers as CUDA IPC handles, which memory-saver regions
        # cannot give out; the trainer's engine never releases its weights in server mode anyway.
        engine_config = engine_config.with_options(memory_saver=Switch.OFF)
    llm = LLM(config=engine_config)
    policy = llm.engine.model
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    run = Run(cfg, llm, policy, optimizer, warmup_scheduler(optimizer, cfg.optim.warmup_steps), reward_fn,
              prompts, held_out or [], random.Random(cfg.seed))
    # Both copies are taken from the initial weights, before any checkpoint is loaded: the reference
    # stays the initial policy for the whole run.
    if cfg.kl.coef > 0:
        run.reference = frozen_reference(policy)
    if cfg.algorithm.advantage == "gae":
        value_model = ValueModel.from_policy(policy)
        critic_opt = torch.optim.AdamW(value_model.parameters(), lr=cfg.critic.lr,
                                       weight_decay=cfg.optim.weight_decay)
        run.critic = Critic(value_model, critic_opt)
        run.critic_scheduler = warmup_scheduler(critic_opt, cfg.optim.warmup_steps)
    return run


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_state(run: Run) -> dict[str, Any]:
    state = {"next_step": run.next_step, "config": to_dict(run.cfg), "history": run.history,
             "data_consumed": run.prompts.consumed, "policy": run.policy.state_dict(),
             "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "rng": rng_state(run.rng, run.llm.engine)}
    if run.critic is not None:
        assert run.critic_scheduler is not None      # made together with the critic
        state |= {"critic": run.critic.model.state_dict(), "critic_optimizer": run.critic.optimizer.state_dict(),
                  "critic_scheduler": run.critic_scheduler.state_dict()}
    return state


def restore(run: Run, path: Path, state: dict[str, Any] | None = None) -> None:
    """Load the checkpoint at `path` (or its already loaded `state`) into the run."""
    state = load_checkpoint(path) if state is None else state
    run.policy.load_state_dict(state["policy"])      # in place: the engine serves the restored weights
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.critic is not None:
        if "critic" not in state:
            raise ValueError(f"{path} has no critic, but algorithm.advantage=gae needs one")
        assert run.critic_scheduler is not None
        run.critic.model.load_state_dict(state["critic"])
        run.critic.optimizer.load_state_dict(state["critic_optimizer"])
        run.critic_scheduler.load_state_dict(state["critic_scheduler"])
    restore_rng_state(state["rng"], run.rng, run.llm.engine)
    run.prompts.seek(state["data_consumed"])
    run.next_step = state["next_step"]
    run.history = state["history"]
    run.llm.engine.flush_cache()


def _resume_path(cfg: TrainConfig) -> Path | None:
    if cfg.resume_from:
        return Path(cfg.resume_from)
    if cfg.resume:
        return latest_checkpoint(cfg.output_dir)   # none yet: start from scratch
    return None


# ----------------------------------------------------------------------------- one step's pieces

class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


@torch.no_grad()
def recompute(run: Run, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The trainer's view of the rollout before any update: old logprobs (the PPO ratio's denominator,
    recomputed rather than taken from the engine so that the ratio starts at exactly 1), reference
    logprobs, and the critic's values. In chunks of algorithm.logprob_chunk samples to bound memory."""
    cfg = run.cfg
    width, n = rollout.mask.shape[1], len(rollout.prompt_ids)
    chunk = cfg.algorithm.logprob_chunk or n
    old, ref, values = [], [], []
    for start in range(0, n, chunk):
        p, c = rollout.prompt_ids[start:start + chunk], rollout.completion_ids[start:start + chunk]
        old += completion_logprobs(run.policy, p, c, cfg.rollout.temperature)
        if run.reference is not None:
            ref += completion_logprobs(run.reference, p, c, cfg.rollout.temperature)
        if run.critic is not None:
            values += run.critic.model(p, c)
    def cpu(rows: list[torch.Tensor]) -> torch.Tensor | None:
        return pad([r.float().cpu() for r in rows], width) if rows else None
    old_t = cpu(old)
    assert old_t is not None             # every rollout has at least one sample
    return old_t, cpu(ref), cpu(values)


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    rewards = rollout.rewards
    return {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "solve_rate": (rewards >= 1.0).float().mean().item(),   # verifiable tasks score 1 when right
            "response_length": rollout.mask.sum(-1).mean().item()}


def mismatch_metrics(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the engine's sampling distribution is from the trainer's on the sampled tokens: mean
    |Δ logprob| and KL(engine ‖ trainer) by k3 (the samples come from the engine)."""
    return {"mismatch_abs": masked_mean((engine_logp - trainer_logp).abs(), mask).item(),
            "mismatch_kl": masked_mean(kl_estimate(engine_logp, trainer_logp, "k3"), mask).item()}


def _prompt_text(llm: LLM, prompts: list[list[int]], i: int) -> str:
    """Sample i's prompt as text for an error message (its token ids when there is no tokenizer)."""
    ids, tok = prompts[i], llm.engine.tokenizer
    return str(tok.decode(ids)) if tok is not None else str(ids)


def _prompts_digest(prompts: list[list[int]]) -> str:
    return hashlib.sha1(json.dumps(prompts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the loop

def evaluate(run: Run, cfg: TrainConfig) -> float:
    """Greedy held-out accuracy. The prefix cache is flushed afterwards so that every rollout starts
    from an empty cache, as it does after a resume. A released KV pool (server mode) is taken back for
    the evaluation and released again."""
    released = "kv_cache" in run.llm.engine.released_memory()
    if released:
        run.llm.resume_memory(["kv_cache"])
    if cfg.rollout.agent.enabled:        # multi-turn, with the tools
        accuracy = agent_greedy_accuracy(run.llm, cfg.rollout, run.held_out, run.reward_fn)
    else:
        accuracy = greedy_accuracy(run.llm, run.held_out, run.reward_fn, cfg.rollout.max_tokens)
    run.llm.engine.flush_cache()
    if released:
        run.llm.release_memory(["kv_cache"])
    return accuracy


def train(cfg: TrainConfig, reward_fn: RewardFn | None = None, prompts: PromptStream | None = None,
          held_out: list[Sample] | None = None) -> list[dict[str, Any]]:
    """Run cfg.steps steps (continuing a checkpoint if asked); returns the per-step metrics."""
    if cfg.trainer.sharded or cfg.cluster.backend == "ray":
        raise ValueError("several trainer ranks or Ray placement run through rlserve.rl.run.train "
                         "(what `rlserve train` calls; docs/cluster.md), not this one-process loop")
    from tqdm import tqdm

    out_dir = Path(cfg.output_dir)
    resume_path = _resume_path(cfg)
    state = None
    if resume_path is not None:
        # before anything is built or written: a changed config refuses to resume
        state = load_checkpoint(resume_path)
        check_resume_config(state.get("config"), to_dict(cfg), resume_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    run = setup(cfg, reward_fn, prompts, held_out)
    if resume_path is not None:
        restore(run, resume_path, state)
        del state                        # the run holds the restored copies
        tqdm.write(f"resumed from {resume_path} at step {run.next_step}")
    llm, algo = run.llm, cfg.algorithm
    log = MetricLog(out_dir, cfg.logging, run.history)
    bar = tqdm(range(run.next_step, cfg.steps), initial=run.next_step, total=cfg.steps, desc="train",
               disable=not cfg.logging.progress_bar, dynamic_ncols=True)
    if run.next_step == 0 and cfg.task.eval_every and run.held_out:
        # The starting point, so a run's own log shows what training gained.
        timer = Timer()
        with timer("eval_s"):
            start = {"step": -1, "eval_accuracy": evaluate(run, cfg)}
        start |= timer.seconds
        run.history.append(start)
        log.log(start)
        tqdm.write(f"held-out accuracy before training: {start['eval_accuracy']:.3f}")
    remote = None
    if cfg.rollout.backend == "server":
        from rlserve.rl.remote import RemoteRollout
        # The servers roll out: this engine's KV pool would only sit there (on one GPU, beside a server's).
        llm.release_memory(["kv_cache"])
        remote = RemoteRollout.start(cfg.rollout, cfg.model.engine.with_options(seed=cfg.seed), out_dir,
                                     llm.engine.device)
    llm.engine.set_weight_version(str(run.next_step))    # token versions are step numbers
    source = make_source(run, remote)
    loop_start = time.perf_counter()    # elapsed_s: wall time per sample across sync and async modes
    try:
        for step in bar:
            timer = Timer()
            with timer("total_s"):
                seed = run.rng.randrange(2**31)
                # 1. prompts, 2. rollout n per prompt and 3. rewards (rl/sources.py: synchronous,
                # over-sampled with abort, one step off or fully asynchronous)
                rollout, source_metrics = source.next(step, seed, timer)
                prompt_ids = rollout.prompt_ids[::rollout.group_size]
                invalid_keep = invalid_reward_groups(rollout.rewards, rollout.group_size,
                                                     partial(_prompt_text, llm, rollout.prompt_ids),
                                                     cfg.task.on_invalid_reward)
                if invalid_keep is not None:      # on_invalid_reward=drop: the groups with a NaN/inf go
                    rollout = rollout.keep_groups(invalid_keep)
                record: dict[str, Any] = {"step": step, "prompts_sha1": _prompts_digest(prompt_ids),
                                          **(rollout_metrics(rollout) if len(rollout.rewards) else {}),
                                          **source_metrics}
                if invalid_keep is not None:
                    record["groups_invalid_reward"] = int((~invalid_keep).sum())
                # 4. dynamic sampling: a group whose rewards all agree has zero advantage everywhere
                if algo.dynamic_sampling:
                    rollout = rollout.keep_groups(dynamic_sampling_keep(rollout.rewards, rollout.group_size))
                record["groups_kept"] = rollout.num_groups
                if cfg.model.release_kv_cache and remote is None:   # server mode: released for the run
                    llm.release_memory(["kv_cache"])
                if rollout.num_groups > 0:
                    # 5. the trainer's logprobs (old policy, reference) and values, before any update
                    with timer("logprob_s"):
                        old_logp, ref_logp, values = recompute(run, rollout)
                    record |= mismatch_metrics(rollout.engine_logprobs, old_logp, rollout.mask)
                    # tokens of a sample drawn by older weights than its newest tokens (partial rollouts)
                    mask, old_weights, old_metrics = old_token_treatment(
                        rollout, old_logp, step, cfg.rollout.partial_old_tokens, cfg.rollout.partial_tis_cap)
                    record |= old_metrics
                    kl_penalty = None
                    if ref_logp is not None:
                        kl_tokens = kl_estimate(old_logp, ref_logp, cfg.kl.estimator, algo.log_ratio_clamp,
                                                algo.k3_clamp)
                        record["kl_ref"] = masked_mean(kl_tokens, mask).item()
                        if cfg.kl.mode == "reward":
                            kl_penalty = cfg.kl.coef * kl_tokens
                    # 6. advantages
                    advantages, returns = compute_advantages(algo, rollout.rewards, mask, rollout.group_size,
                                                             kl_penalty, values)
                    tis = None
                    if algo.tis_cap:      # truncated importance weights for the engine/trainer mismatch
                        tis = truncated_is_weights(old_logp, rollout.engine_logprobs, mask, algo.tis_cap)
                        record["tis_weight_mean"] = masked_mean(tis, mask).item()
                    if old_weights is not None:
                        tis = old_weights if tis is None else tis * old_weights
                    batch = TrainBatch(rollout.prompt_ids, rollout.completion_ids, mask, old_logp, advantages,
                                       ref_logp, values, returns, tis)
                    # 7. policy (and critic) update over minibatches and epochs
                    with timer("update_s"):
                        generator = torch.Generator().manual_seed(seed)   # minibatch order, seeded per step
                        record |= ppo_update(run.policy, run.optimizer, batch, cfg, generator, run.critic)
                    # the schedule counts train steps that updated (a step with no kept group didn't)
                    record["lr"] = run.scheduler.get_last_lr()[0]
                    run.scheduler.step()
                    if run.critic_scheduler is not None:
                        run.critic_scheduler.step()
                # 8. weight sync: the engine's module is the policy; its cached KV is from the old weights
                with timer("sync_s"):
                    if remote is None:
                        llm.resume_memory(["kv_cache"])  # a no-op unless released above
                    llm.engine.flush_cache()
                    llm.engine.set_weight_version(str(step + 1))   # what its next tokens are sampled by
                # 9. held-out evaluation
                if cfg.task.eval_every and run.held_out and (step + 1) % cfg.task.eval_every == 0:
                    with timer("eval_s"):
                        record["eval_accuracy"] = evaluate(run, cfg)
            record |= timer.seconds
            record["elapsed_s"] = round(time.perf_counter() - loop_start, 3)
            # 10. log and checkpoint
            run.history.append(record)
            run.next_step = step + 1
            log.log(record)
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("reward", "eval_accuracy", "kl_ref", "entropy")
                             if k in record}, refresh=False)
            # every checkpoint_every steps, and after the last step whatever the cadence
            if cfg.checkpoint_every and (run.next_step % cfg.checkpoint_every == 0 or run.next_step == cfg.steps):
                save_checkpoint(out_dir, step, checkpoint_state(run), keep=cfg.checkpoint_keep)
    finally:
        bar.close()
        log.close()
        try:
            source.close()
        finally:
            if remote is not None:
                remote.close()
    log.plot()
    return run.history
