"""Where asynchronous training's prompt groups come from (a Drawer): one /generate request of n per prompt
(SingleTurn), multi-turn agent samples (rl/agent/rollout.py: AgentDrawer), or either in a child process
(rl/draw_process.py). rl/async_loop.py drives them from its producer threads."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from rlserve.rl.batch import Rollout
from rlserve.rl.config import RolloutSection, TrainConfig
from rlserve.rl.partial import GroupState, build_rollout, spans_to_versions
from rlserve.rl.rewards import RewardFn

if TYPE_CHECKING:
    from rlserve.llm import LLM
    from rlserve.rl.remote import RemoteRollout

Encoded = list[tuple[list[int], dict[str, Any]]]


def remote_groups(remote: RemoteRollout, cfg: RolloutSection, encoded: Encoded, seed: int, version: int
                  ) -> list[GroupState]:
    """Each prompt's group from the servers (the same request as remote.generate_rollout: prompt i draws
    with seeds seed + i·n + j), every token with the weight version the servers report for it (`version`
    when they report none)."""
    params = [{"n": cfg.group_size, "temperature": cfg.temperature, "max_new_tokens": cfg.max_tokens,
               "seed": seed + i * cfg.group_size, "ignore_eos": cfg.ignore_eos, "logprobs_mode": "tempered",
               **(cfg.constraint or {})} for i in range(len(encoded))]
    answers = remote._generate([ids for ids, _ in encoded], params)
    groups = []
    for (ids, fields), items in zip(encoded, answers):
        group = GroupState.fresh(ids, fields, cfg.group_size)
        for sample, item in zip(group.samples, items):
            tokens = list(item["output_ids"])
            meta = item["meta_info"]
            lps = [lp for lp, _, _ in meta["output_token_logprobs"]]
            versions = spans_to_versions(meta.get("weight_version_spans") or [], len(tokens), version)
            sample.extend(tokens, lps, versions, item["text"], (meta.get("finish_reason") or {}).get("type", "stop"))
        groups.append(group)
    return groups


class Drawer(Protocol):
    """Where asynchronous training's groups come from: draw (in a background thread) and, once taken,
    the Rollout they train as (rewards included)."""
    def draw(self, encoded: Encoded, seed: int, version: int) -> list[Any]: ...

    def rollout(self, groups: list[Any]) -> Rollout: ...


class SingleTurn:
    """One /generate request of n per prompt (remote_groups)."""

    def __init__(self, cfg: RolloutSection, remote: RemoteRollout, reward_fn: RewardFn) -> None:
        self.cfg, self.remote, self.reward_fn = cfg, remote, reward_fn

    def draw(self, encoded: Encoded, seed: int, version: int) -> list[GroupState]:
        return remote_groups(self.remote, self.cfg, encoded, seed, version)

    def rollout(self, groups: list[GroupState]) -> Rollout:
        return build_rollout(groups, self.cfg.group_size, self.reward_fn)


def make_drawer(cfg: TrainConfig, llm: LLM, remote: RemoteRollout, reward_fn: RewardFn) -> Drawer:
    if cfg.rollout.agent.enabled:              # multi-turn samples: each turn one /generate request
        from rlserve.rl.agent.rollout import AgentDrawer
        return AgentDrawer(llm, cfg.rollout, remote, reward_fn)
    return SingleTurn(cfg.rollout, remote, reward_fn)
