"""Tools for agentic rollouts: an async callable with the JSON schema of its arguments. A call never
raises into the rollout: an unknown tool, bad arguments, an exception or a timeout all come back to
the model as an error message."""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rlserve.tool_parsing import Tool, ToolCall

ToolFn = Callable[..., Awaitable[Any] | Any]


@dataclass(frozen=True)
class AgentTool:
    name: str
    description: str
    parameters: dict[str, Any]           # JSON schema of the keyword arguments
    fn: ToolFn                           # async (preferred) or plain; called with the call's arguments

    @property
    def spec(self) -> Tool:
        return Tool(self.name, self.description, self.parameters)


def is_tool_error(result: str) -> bool:
    """Whether a call's result is a failure: an unknown tool, bad arguments, an exception, a timeout,
    or a sandbox run killed at a limit (call_tool and the sandbox write these as "Error: ..." lines)."""
    return result.startswith("Error: ") or "\nError: " in result


def truncate(text: str, max_chars: int) -> str:
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars] + f"... [truncated, {len(text) - max_chars} more characters]"


async def call_tool(tools: dict[str, AgentTool], call: ToolCall, timeout_s: float, max_chars: int) -> str:
    """The call's result as text for the model. Async tools are cancelled at the timeout; a plain
    function runs in a thread, which cannot be stopped: the rollout moves on and the thread is left
    to finish (prefer async tools, or a subprocess like the sandbox)."""
    tool = tools.get(call.name)
    if tool is None:
        return f"Error: unknown tool {call.name!r}; tools: {', '.join(tools)}"
    try:
        if inspect.iscoroutinefunction(tool.fn):
            pending: Awaitable[Any] = tool.fn(**call.arguments)
        else:
            pending = asyncio.to_thread(tool.fn, **call.arguments)
        result = await asyncio.wait_for(pending, timeout_s)
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, timeout_s)
    except TimeoutError:
        return f"Error: tool {call.name!r} timed out after {timeout_s:g} s"
    except Exception as e:               # the tool's failure is the model's observation, not the run's
        return truncate(f"Error: {type(e).__name__}: {e}", max_chars)
    return truncate(result if isinstance(result, str) else str(result), max_chars)
