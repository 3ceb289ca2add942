"""Where each step's rollout comes from (steps 1–3 of the loop: prompts, n samples per prompt, rewards).

- Synchronous: this step's prompts, drawn now by the weights being trained (colocated engine, or the
  servers after this step's weight push).
- Over-sampled (rollout.over_sample > 1 or rollout.partial): rl/oversample.py, on the colocated engine
  or the servers (their requests aborted through /abort_request).
- Asynchronous (asynchronous.mode, server mode): rl/async_loop.py.

Every source answers next(step, seed, timer) → (rollout with rewards, metrics) and close().
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Protocol

from rlserve.rl.agent.rollout import agent_rollout, server_backend
from rlserve.rl.batch import Rollout
from rlserve.rl.rollout import encode_prompt, generate_rollout

if TYPE_CHECKING:
    from rlserve.rl.remote import RemoteRollout
    from rlserve.rl.train import Run, Timer

log = logging.getLogger("rlserve")
Encoded = list[tuple[list[int], dict[str, Any]]]


class RolloutSource(Protocol):
    def next(self, step: int, seed: int, timer: Timer) -> tuple[Rollout, dict[str, float]]: ...

    def close(self) -> None: ...


def fresh_prompts(run: Run) -> Any:
    """n prompts from the run's stream, encoded: (prompt ids, reward fields) each."""
    def take(n: int) -> Encoded:
        return [encode_prompt(run.llm, s) for s in run.prompts.take(n)] if n > 0 else []
    return take


class Synchronous:
    """This step's prompts, drawn now by this step's weights."""

    def __init__(self, run: Run, remote: RemoteRollout | None) -> None:
        self.run, self.remote = run, remote

    def next(self, step: int, seed: int, timer: Timer) -> tuple[Rollout, dict[str, float]]:
        run, remote, cfg = self.run, self.remote, self.run.cfg
        encoded = fresh_prompts(run)(cfg.task.prompts_per_step)
        prompt_ids, fields = [ids for ids, _ in encoded], [f for _, f in encoded]
        if remote is not None:
            # server mode: the servers serve this step's weights, versioned by the step
            with timer("push_s"):
                resumed = remote.push_weights(run.llm, step)
            if cfg.rollout.server_offload:
                timer.add("offload_s", resumed)
        with timer("rollout_s"):
            if cfg.rollout.agent.enabled:          # multi-turn tool use: each turn one engine/server request
                with nullcontext() if remote is None else remote.server_failures():
                    backend = None if remote is None else server_backend(remote)
                    rollout = agent_rollout(run.llm, cfg.rollout, prompt_ids, fields, run.reward_fn, seed,
                                            backend=backend)
            elif remote is None:
                rollout = generate_rollout(run.llm, cfg.rollout, prompt_ids, fields, run.reward_fn, seed)
            else:
                rollout = remote.generate_rollout(cfg.rollout, prompt_ids, fields, run.reward_fn, seed)
        if remote is not None and cfg.rollout.server_offload:
            with timer("offload_s"):          # the servers' memory is the trainer's until the next push
                remote.release_memory()
        return rollout, dict(rollout.metrics)     # agentic rollouts: turns, tool calls, statuses

    def close(self) -> None:
        pass


class OverSampled:
    """Over-sampling with abort (and partial rollouts), colocated or on the servers: rl/oversample.py."""

    def __init__(self, run: Run, remote: RemoteRollout | None = None) -> None:
        from rlserve.rl.oversample import OverSampler, RemoteOverSampler
        self.run, self.remote = run, remote
        cfg = run.cfg
        self.sampler: OverSampler | RemoteOverSampler
        if remote is None:
            self.sampler = OverSampler(run.llm, cfg.rollout, run.reward_fn, cfg.algorithm.dynamic_sampling)
        else:
            self.sampler = RemoteOverSampler(remote, cfg.rollout, run.reward_fn, cfg.algorithm.dynamic_sampling)

    def next(self, step: int, seed: int, timer: Timer) -> tuple[Rollout, dict[str, float]]:
        from rlserve.rl.oversample import RemoteOverSampler
        run, remote = self.run, self.remote
        if remote is not None:
            with timer("push_s"):
                resumed = remote.push_weights(run.llm, step)
            if run.cfg.rollout.server_offload:
                timer.add("offload_s", resumed)
            if isinstance(self.sampler, RemoteOverSampler):
                self.sampler.version = step      # what the servers' tokens are sampled by
        with timer("rollout_s"):
            out = self.sampler.rollout(run.cfg.task.prompts_per_step, fresh_prompts(run), seed)
        if remote is not None and run.cfg.rollout.server_offload:
            with timer("offload_s"):
                remote.release_memory()
        return out

    def close(self) -> None:
        pass


def make_source(run: Run, remote: RemoteRollout | None) -> RolloutSource:
    cfg = run.cfg
    mode = cfg.asynchronous.mode
    if remote is not None:
        if mode != "off":
            from rlserve.rl.async_loop import FullAsync, OneStepOff
            if cfg.rollout.server_offload:
                raise ValueError("asynchronous training keeps the servers generating while the trainer updates: "
                                 "turn rollout.server_offload off")
            kind = OneStepOff if mode == "one_step_off" else FullAsync
            return kind(cfg, run.llm, remote, run.reward_fn, fresh_prompts(run))
        if cfg.rollout.over_sample > 1 or cfg.rollout.partial:
            return OverSampled(run, remote)
        return Synchronous(run, remote)
    if mode != "off":
        # the engine serves the module the optimizer updates: its rollouts cannot overlap the update
        log.warning("asynchronous.mode=%s needs rollout.backend=server; this colocated run is synchronous", mode)
    if cfg.rollout.over_sample > 1 or cfg.rollout.partial:
        return OverSampled(run)
    return Synchronous(run, None)
