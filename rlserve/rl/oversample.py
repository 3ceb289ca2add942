"""Over-sampling with abort (rollout.over_sample, rollout.partial), on the colocated engine (OverSampler)
or on the servers of server mode (RemoteOverSampler: one /generate request per group, with its own rid,
aborted through POST /abort_request; the aborted request answers with what it generated so far).

A step starts ceil(over_sample · prompts_per_step) prompt groups: first the groups a previous step left
unfinished (a queue, oldest first), then fresh prompts. It steps the engine itself and looks at each group
the moment its last sample finishes: the group is scored and, with dynamic sampling, kept only when its
rewards disagree. Once `need` groups are kept the rest are aborted on the engine (their KV is freed at
once) and go back to the front of the queue: from scratch, or with partial rollouts as far as they got
(each unfinished sample resumes as its own request, prompt + its tokens, for its remaining budget).
Groups that finished in the same engine step as the last kept one go back too (whole, with partial).
"""
from __future__ import annotations

import asyncio
import itertools
import math
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlserve.llm import LLM
from rlserve.outputs import CompletionOutput
from rlserve.rl.algorithms import dynamic_sampling_keep
from rlserve.rl.batch import Rollout
from rlserve.rl.config import RolloutSection
from rlserve.rl.partial import GroupState, build_rollout, spans_to_versions
from rlserve.rl.rewards import RewardFn
from rlserve.sampling import SamplingParams

if TYPE_CHECKING:
    from rlserve.client import AsyncClient
    from rlserve.rl.remote import RemoteRollout

# (prompt ids, reward fields) of n fresh prompts
FreshPrompts = Callable[[int], list[tuple[list[int], dict[str, Any]]]]
# (prompt ids, n, max tokens, seed, the group's sample indices) of one request
Request = tuple[list[int], int, int, int, list[int]]
ABORT_RETRY_S = 1.0          # a request that reached a server after its abort is aborted again


@dataclass
class _Step:
    """One over-sampled step's groups: which still wait on requests, which were kept or filtered."""
    groups: list[GroupState]
    need: int
    cfg: RolloutSection
    reward_fn: RewardFn
    dynamic_sampling: bool
    pending: dict[int, set[str]] = field(default_factory=dict)    # slot → its requests still running
    kept: list[int] = field(default_factory=list)
    filtered: int = 0

    def judge(self, slots: list[int]) -> None:
        """Groups whose last sample just finished: kept (until `need` are), or dropped by dynamic sampling."""
        for slot in slots:
            if len(self.kept) >= self.need:
                return
            if self.dynamic_sampling:
                scored = build_rollout([self.groups[slot]], self.cfg.group_size, self.reward_fn)
                if not bool(dynamic_sampling_keep(scored.rewards, self.cfg.group_size)[0]):
                    self.filtered += 1
                    self.pending.pop(slot)
                    continue
            self.kept.append(slot)
            self.pending.pop(slot)

    @property
    def running(self) -> bool:
        return len(self.kept) < self.need and any(self.pending.values())


def start_groups(queue: deque[GroupState], cfg: RolloutSection, need: int, fresh: FreshPrompts) -> list[GroupState]:
    """ceil(over_sample · need) groups: the queue's first, then fresh prompts."""
    start = math.ceil(need * cfg.over_sample)
    groups = [queue.popleft() for _ in range(min(start, len(queue)))]
    return groups + [GroupState.fresh(ids, f, cfg.group_size) for ids, f in fresh(start - len(groups))]


def requests_for(group: GroupState, cfg: RolloutSection, seed: int) -> list[Request]:
    """The group's unfinished samples as requests: one of n when none has started (the same seeds as
    rollout.generate_rollout: sample j draws with seed + j), else one per unfinished sample, prompt + its
    tokens, for its remaining budget, with seed + j (distinct within the group)."""
    g = cfg.group_size
    if not group.started:
        return [(group.prompt_ids, g, cfg.max_tokens, seed, list(range(g)))]
    return [(group.prompt_ids + s.tokens, 1, cfg.max_tokens - len(s.tokens), seed + j, [j])
            for j, s in enumerate(group.samples) if not s.finished]


def finish_step(step: _Step, queue: deque[GroupState], aborted: set[int], reward_fn: RewardFn
                ) -> tuple[Rollout, dict[str, float]]:
    """Groups neither kept nor filtered go back to the front of the queue (from scratch without partial
    rollouts); the kept ones are the step's rollout."""
    cfg, wasted, back = step.cfg, 0, []
    for slot in sorted(step.pending):
        group = step.groups[slot]
        group.aborts += slot in aborted
        if not cfg.partial:
            wasted += group.generated_tokens()
            group = group.restart()
        back.append(group)
    queue.extendleft(reversed(back))
    rollout = build_rollout([step.groups[s] for s in step.kept], cfg.group_size, reward_fn)
    return rollout, {"groups_started": float(len(step.groups)), "groups_filtered": float(step.filtered),
                     "groups_aborted": float(len(aborted)), "groups_queued": float(len(queue)),
                     "tokens_wasted": float(wasted)}


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
        step = _Step(start_groups(self.queue, cfg, need, fresh), need, cfg, self.reward_fn, self.dynamic_sampling)
        requests: dict[str, tuple[int, list[int]]] = {}
        done: list[int] = []
        for slot, group in enumerate(step.groups):
            step.pending[slot] = set()
            for ids, n, max_tokens, s, indices in requests_for(group, cfg, seed + slot * cfg.group_size):
                rid = f"os-{self._rids}"
                self._rids += 1
                engine.add_request(ids, self._params(s, n, max_tokens), rid=rid)
                requests[rid] = (slot, indices)
                step.pending[slot].add(rid)
            if not step.pending[slot]:            # carried over whole (partial): done already
                done.append(slot)
        step.judge(done)
        try:
            while step.running:
                finished: list[int] = []
                for out in engine.step(emit_unfinished=False):
                    if not out.finished or out.request_id not in requests:
                        continue
                    slot, indices = requests.pop(out.request_id)
                    self._fold(step.groups[slot], indices, out.outputs)
                    step.pending[slot].discard(out.request_id)
                    if not step.pending[slot]:
                        finished.append(slot)
                step.judge(finished)
        finally:
            aborted = self._abort(requests, step.groups)
        return finish_step(step, self.queue, aborted, self.reward_fn)

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


class RemoteOverSampler:
    """The same over the servers: each request is one /generate call with its own rid, spread by group
    round-robin over the servers (behind a router: through it, which forwards the rid to the worker it
    picks; aborted by rid on every worker). The surplus is
    aborted with POST /abort_request and its answer (what it generated so far) awaited, so nothing of it
    keeps running or holds KV once the step ends. `version`: the weights the servers serve (the step)."""

    def __init__(self, remote: RemoteRollout, cfg: RolloutSection, reward_fn: RewardFn,
                 dynamic_sampling: bool) -> None:
        self.remote, self.cfg, self.reward_fn = remote, cfg, reward_fn
        self.dynamic_sampling = dynamic_sampling
        self.queue: deque[GroupState] = deque()
        self.version = 0
        self._prefix = f"os-{uuid.uuid4().hex[:12]}-"
        self._rids = itertools.count()

    def _params(self, seed: int, n: int, max_tokens: int) -> dict[str, Any]:
        cfg = self.cfg
        sp = {"n": n, "temperature": cfg.temperature, "max_new_tokens": max_tokens, "ignore_eos": cfg.ignore_eos,
              **(cfg.constraint or {})}
        if self.remote.router is not None:       # the router forwards neither seed nor logprobs_mode
            return sp | {"sampling_seed": seed}
        return sp | {"seed": seed, "logprobs_mode": "tempered"}

    def _fold(self, group: GroupState, indices: list[int], answer: Any) -> None:
        items = answer if isinstance(answer, list) else [answer]
        for j, item in zip(indices, items):
            meta = item["meta_info"]
            tokens = list(item["output_ids"])
            finish = (meta.get("finish_reason") or {}).get("type", "abort")
            group.samples[j].extend(tokens, [lp for lp, _, _ in meta["output_token_logprobs"]],
                                    spans_to_versions(meta.get("weight_version_spans") or [], len(tokens),
                                                      self.version), item["text"], finish)

    def rollout(self, need: int, fresh: FreshPrompts, seed: int) -> tuple[Rollout, dict[str, float]]:
        """As OverSampler.rollout, over the servers."""
        step, aborted = asyncio.run(self._rollout(need, fresh, seed))
        return finish_step(step, self.queue, aborted, self.reward_fn)

    async def _rollout(self, need: int, fresh: FreshPrompts, seed: int) -> tuple[_Step, set[int]]:
        from rlserve.client import AsyncClient

        cfg, remote = self.cfg, self.remote
        key = remote.admin_api_key
        # every started group's request in flight at once (no connection bound: the server batches them)
        senders = [AsyncClient(remote.router.base_url, admin_api_key=key, timeout=None, max_connections=None)] \
            if remote.router else [AsyncClient(u, admin_api_key=key, timeout=None, max_connections=None)
                                   for u in remote.urls]
        # where an abort goes: every server; behind a router (which forwards the rid but does not route
        # /abort_request) every worker, those it lists now too (one added since the run started)
        urls = remote.urls
        if remote.router is not None:
            urls = list(dict.fromkeys(urls + await asyncio.to_thread(remote.router.worker_urls)))
        workers = [AsyncClient(u, admin_api_key=key) for u in urls]
        step = _Step(start_groups(self.queue, cfg, need, fresh), need, cfg, self.reward_fn, self.dynamic_sampling)
        tasks: dict[asyncio.Future[Any], tuple[int, list[int], str]] = {}
        aborted: set[int] = set()
        try:
            done: list[int] = []
            for slot, group in enumerate(step.groups):
                step.pending[slot] = set()
                client = senders[slot % len(senders)]
                for ids, n, max_tokens, s, indices in requests_for(group, cfg, seed + slot * cfg.group_size):
                    rid = f"{self._prefix}{next(self._rids)}"
                    task = asyncio.ensure_future(client.generate(
                        input_ids=ids, sampling_params=self._params(s, n, max_tokens), rid=rid, return_logprob=True))
                    tasks[task] = (slot, indices, rid)
                    step.pending[slot].add(rid)
                if not step.pending[slot]:
                    done.append(slot)
            # scoring runs its own event loop (rewards.score_batch): judged in a thread
            await asyncio.to_thread(step.judge, done)
            while step.running:
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                slots: list[int] = []
                for t in finished:
                    slot, indices, rid = tasks.pop(t)
                    self._fold(step.groups[slot], indices, t.result())
                    step.pending[slot].discard(rid)
                    if not step.pending[slot]:
                        slots.append(slot)
                await asyncio.to_thread(step.judge, slots)
            aborted = await self._abort(tasks, step.groups, workers)
        finally:
            for t in tasks:                       # only after a failure: stop waiting on the rest
                t.cancel()
            for c in senders + workers:
                await c.aclose()
        return step, aborted

    async def _abort(self, tasks: dict[asyncio.Future[Any], tuple[int, list[int], str]], groups: list[GroupState],
                     workers: list[AsyncClient]) -> set[int]:
        """Abort every request still running and fold what each had generated, once it has answered."""
        slots = {slot for slot, _, _ in tasks.values()}
        while tasks:
            await asyncio.gather(*(w.abort_request(rid) for _, _, rid in tasks.values() for w in workers))
            finished, _ = await asyncio.wait(tasks, timeout=ABORT_RETRY_S)
            for t in finished:
                slot, indices, _ = tasks.pop(t)
                self._fold(groups[slot], indices, t.result())
        return slots
