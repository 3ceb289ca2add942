"""An echo tool that every turn calls, for agent tests on random models: a sample never answers, so it
runs max_turns turns; and the response such a sample must have, rebuilt from its generated runs."""
from __future__ import annotations

import asyncio
import random

from rlserve import LLM
from rlserve.rl.agent.render import TurnRenderer
from rlserve.rl.agent.tools import AgentTool
from rlserve.tool_parsing import ToolCall

# A random model seldom samples its end-of-turn token: a third of the vocabulary ends a turn instead
# (a stop condition only, the sampled distribution and its logprobs are unchanged).
STOPS = list(range(0, 49152, 3))


async def echo(text: str) -> str:
    return f"echo: {text[:20]}"


ECHO = AgentTool("echo", "repeat", {"type": "object", "properties": {"text": {"type": "string"}}}, echo)


def every_turn_calls_echo(text: str) -> list[ToolCall]:
    return [ToolCall("echo", {"text": text})]     # never an answer: every sample runs max_turns


def chat_prompts(llm: LLM, n: int) -> list[list[int]]:
    rng = random.Random(0)
    return [llm.encode(llm.apply_chat_template([{"role": "user", "content": " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(2, 8)))}]))[1]
            for _ in range(n)]


def rebuilt(llm: LLM, ids: list[int], mask: list[int]) -> list[int]:
    """The response as the agent loop must have built it from its generated runs (mask 1): each turn,
    then the closing separator, the echo tool's message and the next assistant header (mask 0)."""
    tok = llm.engine.tokenizer
    renderer = TurnRenderer(tok)
    runs: list[list[int]] = []
    for k, (t, on) in enumerate(zip(ids, mask)):
        if on and (k == 0 or not mask[k - 1]):
            runs.append([])
        if on:
            runs[-1].append(t)
    out: list[int] = []
    for k, turn in enumerate(runs):
        out += turn
        if k + 1 < len(runs):
            text = tok.decode(turn[:-1], skip_special_tokens=True)    # the stop token is not in the text
            out += renderer.tool_results([asyncio.run(echo(text))], tok.decode(turn[-1:]))
    return out
