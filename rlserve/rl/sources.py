"""Where each step's rollout comes from (steps 1–3 of the loop: prompts, n samples per prompt, rewards).

- Synchronous: this step's prompts, drawn now by the weights being trained (colocated engine, or the
  servers after this step's weight push).
- Over-sampled (rollout.over_sample > 1 or rollout.partial, colocated): rl/oversample.py.
- Asynchronous (asynchronous.mode, server mode): rl/async_loop.py.

Every source answers next(step, seed, timer) → (rollout with rewards, metrics) and close().
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from rlserve.rl.agent.rollout import agent_rollout
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
            if remote is None:
                generate = agent_rollout if cfg.rollout.agent.enabled else generate_rollout   # multi-turn tool use
                rollout = generate(run.llm, cfg.rollout, prompt_ids, fields, run.reward_fn, seed)
            else:
                rollout = remote.generate_rollout(cfg.rollout, prompt_ids, fields, run.reward_fn, seed)
        if remote is not None and cfg.rollout.server_offload:
            with timer("offload_s"):          # the servers' memory is the trainer's until the next push
                remote.release_memory()
        return rollout, dict(rollout.metrics)     # agentic rollouts: turns, tool calls, statuses

    def close(self) -> None:
        pass


class OverSampled:
    """Colocated over-sampling with abort (and partial rollouts): rl/oversample.py."""

    def __init__(self, run: Run) -> None:
        from rlserve.rl.oversample import OverSampler
        self.run = run
        self.sampler = OverSampler(run.llm, run.cfg.rollout, run.reward_fn, run.cfg.algorithm.dynamic_sampling)

    def next(self, step: int, seed: int, timer: Timer) -> tuple[Rollout, dict[str, float]]:
        with timer("rollout_s"):
            return self.sampler.rollout(self.run.cfg.task.prompts_per_step, fresh_prompts(self.run), seed)

    def close(self) -> None:
        pass


def make_source(run: Run, remote: RemoteRollout | None) -> RolloutSource:
    cfg = run.cfg
    mode = cfg.asynchronous.mode
    if remote is not None:
        if cfg.rollout.over_sample > 1 or cfg.rollout.partial:
            log.warning("rollout.over_sample and rollout.partial apply to the colocated engine; server mode "
                        "draws each step's prompts whole")
        if mode != "off":
            from rlserve.rl.async_loop import FullAsync, OneStepOff
            if cfg.rollout.server_offload:
                raise ValueError("asynchronous training keeps the servers generating while the trainer updates: "
                                 "turn rollout.server_offload off")
            kind = OneStepOff if mode == "one_step_off" else FullAsync
            return kind(cfg, run.llm, remote, run.reward_fn, fresh_prompts(run))
        return Synchronous(run, remote)
    if mode != "off":
        # the engine serves the module the optimizer updates: its rollouts cannot overlap the update
        log.warning("asynchronous.mode=%s needs rollout.backend=server; this colocated run is synchronous", mode)
    if cfg.rollout.over_sample > 1 or cfg.rollout.partial:
        return OverSampled(run)
    return Synchronous(run, None)
