"""Agentic rollouts for the training loop: `agent_rollout` has generate_rollout's signature and
returns the same `Rollout` (prompt = the first prompt, completion = every token after it, mask = the
loss mask), so the update, advantages and metrics take multi-turn samples unchanged."""
from __future__ import annotations

import asyncio
import copy
import inspect
from typing import TYPE_CHECKING, Any

from rlserve.llm import LLM
from rlserve.rl.agent.backend import Backend, EngineBackend, ServerBackend
from rlserve.rl.agent.lookup import Corpus, lookup_tool
from rlserve.rl.agent.loop import AgentLoop, AgentOptions, Parser, tool_parser
from rlserve.rl.agent.render import TurnRenderer
from rlserve.rl.agent.sample import AgentGroup, Sample, samples_to_rollout
from rlserve.rl.agent.sandbox import SandboxLimits
from rlserve.rl.agent.spawner import python_tool
from rlserve.rl.agent.tools import AgentTool
from rlserve.rl.batch import Rollout
from rlserve.rl.config import AgentSection, RolloutSection
from rlserve.rl.rewards import RewardFn, score
from rlserve.sampling import SamplingParams

if TYPE_CHECKING:
    from rlserve.rl.remote import RemoteRollout


def build_tools(agent: AgentSection) -> list[AgentTool]:
    """The tools rollout.agent.tools names."""
    tools = []
    for name in agent.tools:
        if name == "python":
            tools.append(python_tool(SandboxLimits(timeout_s=agent.tool_timeout_s, cpu_s=agent.sandbox_cpu_s,
                                                   memory_mb=agent.sandbox_memory_mb,
                                                   max_output_chars=agent.max_tool_output_chars)))
        elif name == "lookup":
            assert agent.corpus is not None           # AgentSection checks it
            tools.append(lookup_tool(Corpus.from_jsonl(agent.corpus), agent.lookup_k))
    return tools


def _options(cfg: RolloutSection) -> AgentOptions:
    a = cfg.agent
    return AgentOptions(max_turns=a.max_turns, max_tokens=cfg.max_tokens, max_turn_tokens=a.max_turn_tokens,
                        tool_timeout_s=a.tool_timeout_s, max_tool_output_chars=a.max_tool_output_chars)


def run_agent(llm: LLM | None, cfg: RolloutSection, prompts: list[list[int]], fields: list[dict[str, Any]],
              reward_fn: RewardFn, seeds: list[int | None], temperature: float,
              tools: list[AgentTool] | None = None, parser: Parser | None = None,
              backend: Backend | None = None, tokenizer: Any = None) -> list[Sample]:
    """Run one sample per entry of `prompts` to its end and score it. `tokenizer`: the one to render tool
    segments with (default the engine's; a rollout thread beside the trainer brings its own copy). `llm`
    may be None where both `backend` and `tokenizer` are given (a rollout process has no engine)."""
    if llm is None and (backend is None or tokenizer is None):
        raise ValueError("run_agent without an engine needs both a backend and a tokenizer")
    tools = build_tools(cfg.agent) if tools is None else tools
    parser = parser or tool_parser(tools, cfg.agent.tool_parser)
    extra: dict[str, Any] = {}
    if cfg.agent.tool_parser == "markdown":   # a turn ends where its code block does: run it now
        extra = {"stop": ["\n```\n"], "include_stop_str_in_output": True}
    params = SamplingParams(temperature=temperature, **(extra | (cfg.constraint or {})))
    engine_backend = EngineBackend(llm.engine) if backend is None and llm is not None else None
    if tokenizer is None:
        assert llm is not None                   # checked above
        tokenizer = llm.engine.tokenizer
    tok = tokenizer
    loop = AgentLoop(backend or engine_backend, TurnRenderer(tok), tools,  # type: ignore[arg-type]
                     params, _options(cfg), parser)

    async def run() -> list[Sample]:
        try:
            samples = await loop.run_all(prompts, seeds, fields)
        finally:
            if isinstance(backend, ServerBackend):
                await backend.aclose()
        rewards = await asyncio.gather(*(score(reward_fn, tok.decode(s.prompt_ids), s.final_text,
                                               _reward_fields(reward_fn, s)) for s in samples))
        for s, r in zip(samples, rewards):
            s.reward = r
        return samples
    try:
        return asyncio.run(run())
    finally:
        if engine_backend is not None:
            engine_backend.close()


def _reward_fields(fn: RewardFn, sample: Sample) -> dict[str, Any]:
    """The task's fields, plus the whole `sample` (turns, tool calls, status) for a reward that takes it."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return sample.fields
    if "sample" in params:
        return sample.fields | {"sample": sample}
    return sample.fields


def agent_rollout(llm: LLM, cfg: RolloutSection, prompts: list[list[int]], fields: list[dict[str, Any]],
                  reward_fn: RewardFn, seed: int, tools: list[AgentTool] | None = None,
                  parser: Parser | None = None, backend: Backend | None = None) -> Rollout:
    """cfg.group_size multi-turn samples per prompt, group by group. Sample j of prompt i draws turn t
    with seed + (i·n + j)·max_turns + t, so every sample of a group differs and a step depends only on
    its seed, the weights and the tools."""
    groups = agent_groups(llm, cfg, prompts, fields, reward_fn, seed, tools, parser, backend)
    return groups_to_rollout(llm, groups, cfg.group_size)


def agent_groups(llm: LLM | None, cfg: RolloutSection, prompts: list[list[int]], fields: list[dict[str, Any]],
                 reward_fn: RewardFn, seed: int, tools: list[AgentTool] | None = None,
                 parser: Parser | None = None, backend: Backend | None = None, tokenizer: Any = None
                 ) -> list[AgentGroup]:
    """agent_rollout's samples, scored, as one AgentGroup per prompt."""
    n, turns = cfg.group_size, cfg.agent.max_turns
    flat = [p for p in prompts for _ in range(n)]
    flat_fields = [f for f in fields for _ in range(n)]
    seeds: list[int | None] = [seed + k * turns for k in range(len(flat))]
    samples = run_agent(llm, cfg, flat, flat_fields, reward_fn, seeds, cfg.temperature, tools, parser, backend,
                        tokenizer)
    return [AgentGroup(samples[i:i + n]) for i in range(0, len(samples), n)]


def groups_to_rollout(llm: LLM, groups: list[AgentGroup], group_size: int) -> Rollout:
    samples = [s for g in groups for s in g.samples]
    tok = llm.engine.tokenizer
    return samples_to_rollout(samples, [tok.decode(s.response_ids) for s in samples], group_size)


def server_backend(remote: RemoteRollout) -> ServerBackend:
    """A backend over the run's servers (behind a router: the router), for one rollout's event loop."""
    key = remote.admin_api_key
    if remote.router is not None:
        return ServerBackend([remote.router.base_url], key, logprobs_mode=None, routed=True)
    return ServerBackend(remote.urls, key)


class AgentDrawer:
    """Asynchronous training's group source for agentic rollouts (rl/async_loop.py): multi-turn samples
    over the servers, one AgentGroup per prompt, each sample's oldest token deciding its group's staleness."""

    def __init__(self, llm: LLM | None, cfg: RolloutSection, remote: RemoteRollout, reward_fn: RewardFn,
                 tokenizer: Any = None) -> None:
        """`llm` None (a rollout process, rl/draw_process.py): draws only, with `tokenizer`."""
        self.llm, self.cfg, self.remote, self.reward_fn = llm, cfg, remote, reward_fn
        self.tools = build_tools(cfg.agent)
        if tokenizer is None:
            if llm is None:
                raise ValueError("an AgentDrawer without an engine needs a tokenizer")
            tokenizer = llm.engine.tokenizer
        # draws run in a thread beside the trainer, whose engine tokenizes too: a fast tokenizer is not
        # safe to share between threads
        self.tokenizer = copy.deepcopy(tokenizer)

    def draw(self, encoded: list[tuple[list[int], dict[str, Any]]], seed: int, version: int) -> list[AgentGroup]:
        with self.remote.server_failures():
            return agent_groups(self.llm, self.cfg, [ids for ids, _ in encoded], [f for _, f in encoded],
                                self.reward_fn, seed, self.tools, backend=server_backend(self.remote),
                                tokenizer=self.tokenizer)

    def rollout(self, groups: list[AgentGroup]) -> Rollout:
        if self.llm is None:
            raise RuntimeError("this AgentDrawer draws only (no engine to decode the rollout with)")
        return groups_to_rollout(self.llm, groups, self.cfg.group_size)


def agent_greedy_accuracy(llm: LLM, cfg: RolloutSection, samples: list[dict[str, Any]], reward_fn: RewardFn,
                          tools: list[AgentTool] | None = None) -> float:
    """Mean reward of greedy multi-turn samples (held-out evaluation of an agent task)."""
    from rlserve.rl.rollout import encode_prompt
    encoded = [encode_prompt(llm, s) for s in samples]
    done = run_agent(llm, cfg, [ids for ids, _ in encoded], [f for _, f in encoded], reward_fn,
                     [None] * len(encoded), 0.0, tools)
    return sum(s.reward for s in done) / max(1, len(done))
