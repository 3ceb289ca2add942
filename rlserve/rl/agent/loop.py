"""The multi-turn agent loop, token in / token out. Per sample:

    generate an assistant turn (stop at the end-of-turn token) → parse tool calls → none: the answer,
    done → run the calls (concurrently, each with a timeout) → append the turn's closing separator,
    the tool messages and the next assistant header as tokens → next turn

until an answer, `max_turns` or the token budget. The sample's ids grow by appending: the engine's own
sampled ids for each turn and separately tokenised template segments, so the trainer scores exactly
what the engine saw. All samples run concurrently; each turn is one backend request, so the live
samples' turns are batched together by the engine.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from rlserve.rl.agent.backend import SAMPLE_INDEX, Backend
from rlserve.rl.agent.render import TurnRenderer
from rlserve.rl.agent.sample import Sample
from rlserve.rl.agent.tools import AgentTool, call_tool, is_tool_error
from rlserve.sampling import SamplingParams
from rlserve.tool_parsing import ToolCall, parse_tool_calls

# text of a turn → the tool calls in it (none: the turn is the answer)
Parser = Callable[[str], list[ToolCall]]


@dataclass(frozen=True)
class AgentOptions:
    max_turns: int = 4                   # assistant turns per sample
    max_tokens: int = 512                # response budget: generated + tool/template tokens after the prompt
    max_turn_tokens: int = 256           # new tokens per assistant turn
    tool_timeout_s: float = 10.0
    max_tool_output_chars: int = 2000
    parallel_tools: bool = True          # a turn's calls run concurrently

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_tokens < 1 or self.max_turn_tokens < 1:
            raise ValueError("max_turns, max_tokens and max_turn_tokens must be ≥ 1")


_CODE_BLOCK = re.compile(r"```(?:python|py)\s*\n(.*?)```", re.DOTALL)


def tool_parser(tools: list[AgentTool], family: str = "qwen") -> Parser:
    """The server's parser for `family` over `tools`: calls naming an offered tool, else none.
    "markdown": every ```python block is a call of the `python` tool (small chat models write code
    blocks on their own long before they follow a tool-call format)."""
    if family == "markdown":
        return lambda text: [ToolCall("python", {"code": c}) for c in _CODE_BLOCK.findall(text)]
    specs = [t.spec for t in tools]
    return lambda text: parse_tool_calls(text, specs, family)[1]


class AgentLoop:
    def __init__(self, backend: Backend, renderer: TurnRenderer, tools: list[AgentTool], params: SamplingParams,
                 options: AgentOptions = AgentOptions(), parser: Parser | None = None) -> None:
        self.backend, self.renderer, self.params, self.options = backend, renderer, params, options
        self.tools = {t.name: t for t in tools}
        self.parser = parser or tool_parser(tools)

    async def run_sample(self, prompt_ids: list[int], seed: int | None, fields: dict[str, Any] | None = None
                         ) -> Sample:
        """One sample to its end. Turn t samples with seed + t, so a sample depends only on its seed,
        the weights and the tools' answers."""
        opt, tok = self.options, self.renderer.tokenizer
        sample = Sample(list(prompt_ids), fields=dict(fields or {}))
        for turn in range(opt.max_turns):
            room = opt.max_tokens - sample.response_length
            if room < 1:
                sample.status = "truncated"
                break
            params = replace(self.params, n=1, max_tokens=min(opt.max_turn_tokens, room), logprobs=0,
                             logprobs_mode="tempered", seed=None if seed is None else seed + turn)
            out = await self.backend.generate(sample.token_ids, params)
            sample.append_generated(out.token_ids, out.logprobs, out.weight_versions)
            sample.turns += 1
            sample.assistant_texts.append(out.text)
            if out.finish_reason == "abort":
                sample.status = "aborted"
                break
            if out.finish_reason != "stop":      # cut by the turn's or the sample's token limit
                sample.status = "truncated"
                break
            calls = self.parser(out.text)
            if not calls:
                sample.status = "finished"
                break
            if turn == opt.max_turns - 1:
                sample.status = "truncated"      # no turn left to read the results: the calls are not run
                break
            sample.tool_calls += len(calls)
            results = await self._run_calls(calls)
            sample.tool_errors += sum(is_tool_error(r) for r in results)
            last = tok.decode(out.token_ids[-1:]) if out.token_ids else ""
            segment = self.renderer.tool_results(results, last)
            if sample.response_length + len(segment) >= opt.max_tokens:
                sample.status = "truncated"      # no room left for the model to read the results and answer
                break
            sample.append_context(segment)
        return sample

    async def _run_calls(self, calls: list[ToolCall]) -> list[str]:
        opt = self.options
        runs = [call_tool(self.tools, c, opt.tool_timeout_s, opt.max_tool_output_chars) for c in calls]
        if opt.parallel_tools:
            return list(await asyncio.gather(*runs))
        return [await r for r in runs]

    async def run_all(self, prompts: list[list[int]], seeds: list[int | None],
                      fields: list[dict[str, Any]] | None = None) -> list[Sample]:
        fields = fields or [{} for _ in prompts]

        async def one(i: int, prompt: list[int], seed: int | None, f: dict[str, Any]) -> Sample:
            SAMPLE_INDEX.set(i)          # this task's context: which server a ServerBackend sends it to
            return await self.run_sample(prompt, seed, f)
        return list(await asyncio.gather(*(one(i, p, s, f) for i, (p, s, f) in enumerate(zip(prompts, seeds, fields)))))
