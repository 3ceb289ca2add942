"""Over-sampling with abort on the colocated engine (rollout.over_sample, rollout.partial).

A step starts ceil(over_sample · prompts_per_step) prompt groups: first the groups a previous step left
unfinished (a queue, oldest first), then fresh prompts. It steps the engine itself and looks at each group
the moment its last sample finishes: the group is scored and, with dynamic sampling, kept only when its
rewards disagree. Once `need` groups are kept the rest are aborted on the engine (their KV is freed at
once) and go back to the front of the queue: from scratch, or with partial rollouts as far as they got
(each unfinished sample resumes as its own request, prompt + its tokens, for its remaining budget).
Groups that finished in the same engine step as the last kept one go back too (whole, with partial).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from rlserve.llm import LLM
from rlserve.outputs import CompletionOutput
from rlserve.rl.algorithms import dynamic_sampling_keep
from rlserve.rl.batch import Rollout
from rlserve.rl.config import RolloutSection
from rlserve.rl.partial import GroupState, build_rollout, spans_to_versions
from rlserve.rl.rewards import RewardFn
from rlserve.sampling import SamplingParams

# (prompt ids, reward fields) of n fresh prompts
FreshPrompts = Callable[[int], list[tuple[list[int], dict[str, Any]]]]


class OverSampler:
    """The colocated rollout that streams groups, keeps what a step needs and aborts the rest."""

    def __init__(self, llm: LLM, cfg: RolloutSection, reward_fn: RewardFn, dynamic_sampling: bool) -> None:
        self.llm, self.cfg, self.reward_fn = llm, cfg, reward_fn
        self.dynamic_sampling = dynamic_sampling
        self.queue: deque[GroupState] = deque()     # unfinished groups, started first next step
        self._rids = 0
        if not llm.engine.weight_version.isdigit():
            # every token's version is an integer (the loop's step number): start at 0
            llm.engine.set_weight_version("0")

    def _params(self, seed: int, n: int, max_tokens: int) -> SamplingParams:
        cfg = self.cfg
        return SamplingParams(n=n, temperature=cfg.temperature, max_tokens=max_tokens, seed=seed, logprobs=0,
                              logprobs_mode="tempered", ignore_eos=cfg.ignore_eos, **(cfg.constraint or {}))

    def _submit(self, slot: int, group: GroupState, seed: int) -> dict[str, tuple[int, list[int]]]:
        """Add the group's unfinished samples to the engine: one request of n when none has started (the
        same seeds as rollout.generate_rollout: sample j draws with seed + j), else one per unfinished
        sample, prompt + its tokens, for its remaining budget, with seed + j (distinct within the group)."""
        engine, g = self.llm.engine, self.cfg.group_size
        out: dict[str, tuple[int, list[int]]] = {}
        if not group.started:
            rid = f"os-{self._rids}"
            self._rids += 1
            engine.add_request(group.prompt_ids, self._params(seed, g, self.cfg.max_tokens), rid=rid)
            return {rid: (slot, list(range(g)))}
        for j, s in enumerate(group.samples):
            if s.finished:
                continue
            rid = f"os-{self._rids}"
            self._rids += 1
            engine.add_request(group.prompt_ids + s.tokens, self._params(seed + j, 1, self.cfg.max_tokens - len(s.tokens)),
                               rid=rid)
            out[rid] = (slot, [j])
        return out

    def _fold(self, group: GroupState, indices: list[int], outputs: list[CompletionOutput]) -> None:
        """Append what the engine generated for these samples (finished or aborted part-way)."""
        version = int(self.llm.engine.weight_version)
        for j, c in zip(indices, outputs):
            assert c.logprobs is not None        # rollouts always ask for logprobs
            lps = [d[t] for d, t in zip(c.logprobs, c.token_ids)]
            # a resumed sample reaching its budget ends "length", as it would have in one go
            group.samples[j].extend(c.token_ids, lps, spans_to_versions(c.weight_version_spans, len(c.token_ids),
                                                                        version), c.text, c.finish_reason)

    def rollout(self, need: int, fresh: FreshPrompts, seed: int) -> tuple[Rollout, dict[str, float]]:
        """`need` groups that pass the filter (fewer when every started group finished first); metrics:
        groups_started, groups_filtered (dynamic sampling), groups_aborted, groups_queued and tokens_wasted
        (generated, then thrown away by an abort; 0 with partial rollouts)."""
        cfg, engine = self.cfg, self.llm.engine
        start = math.ceil(need * cfg.over_sample)
        groups = [self.queue.popleft() for _ in range(min(start, len(self.queue)))]
        groups += [GroupState.fresh(ids, f, cfg.group_size) for ids, f in fresh(start - len(groups))]
        requests: dict[str, tuple[int, list[int]]] = {}
        pending: dict[int, set[str]] = {}
        done: list[int] = []
        for slot, group in enumerate(groups):
            reqs = self._submit(slot, group, seed + slot * cfg.group_size)
            requests |= reqs
            pending[slot] = set(reqs)
            if not reqs:                          # carried over whole (partial): done already
                done.append(slot)
        kept: list[int] = []
        filtered = 0

        def judge(slots: list[int]) -> None:
            nonlocal filtered
            for slot in slots:
                if len(kept) >= need:
                    return
                if self.dynamic_sampling:
                    scored = build_rollout([groups[slot]], cfg.group_size, self.reward_fn)
                    if not bool(dynamic_sampling_keep(scored.rewards, cfg.group_size)[0]):
                        filtered += 1
                        pending.pop(slot)
                        continue
                kept.append(slot)
                pending.pop(slot)
        judge(done)
        try:
            while len(kept) < need and any(pending.values()):
                finished: list[int] = []
                for out in engine.step(emit_unfinished=False):
                    if not out.finished or out.request_id not in requests:
                        continue
                    slot, indices = requests.pop(out.request_id)
                    self._fold(groups[slot], indices, out.outputs)
                    pending[slot].discard(out.request_id)
                    if not pending[slot]:
                        finished.append(slot)
                judge(finished)
        finally:
            aborted = self._abort(requests, groups)
        wasted = 0
        back: list[GroupState] = []
        for slot in sorted(pending):             # neither kept nor filtered: back to the queue
            group = groups[slot]
            group.aborts += slot in aborted
            if not cfg.partial:
                wasted += group.generated_tokens()
                group = group.restart()
            back.append(group)
        self.queue.extendleft(reversed(back))
        rollout = build_rollout([groups[s] for s in kept], cfg.group_size, self.reward_fn)
        return rollout, {"groups_started": float(len(groups)), "groups_filtered": float(filtered), "groups_aborted": float(len(aborted)),
                         "groups_queued": float(len(self.queue)), "tokens_wasted": float(wasted)}

    def _abort(self, requests: dict[str, tuple[int, list[int]]], groups: list[GroupState]) -> set[int]:
        """Abort every request still running (KV freed), keeping what each sample generated, and let an
        in-flight engine step finish (its tokens of aborted requests are dropped)."""
        engine, slots = self.llm.engine, set()
        for rid, (slot, indices) in list(requests.items()):
            out = engine.abort(rid)
            if out is not None:
                self._fold(groups[slot], indices, out.outputs)
            slots.add(slot)
        requests.clear()
        while engine.in_flight:
            engine.step(emit_unfinished=False)
        return slots
