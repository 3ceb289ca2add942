"""Tool calls in generated text, without any server dependency: the tool and call types, the system
prompt that describes tools to templates that ignore `tools`, and the parsers. The server
(rlserve/server/tools.py) and the RL agent loop (rlserve/rl/agent/) share them.

Formats understood in generated text:
- "qwen":   <tool_call>{"name": ..., "arguments": {...}}</tool_call> (one or more)
- "llama3": the whole reply is {"name": ..., "parameters"|"arguments": {...}} (optionally after
            <|python_tag|>), or a list of such objects
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
FAMILIES = ("qwen", "llama3")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                             "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}
        if index is not None:
            d["index"] = index
        return d


def tools_system_prompt(tools: list[Tool]) -> str:
    """For chat templates that ignore `tools`: describe them in a system message, Qwen-style."""
    specs = "\n".join(json.dumps({"type": "function", "function": {
        "name": t.name, "description": t.description, "parameters": t.parameters}}) for t in tools)
    return ("You may call one or more functions to assist with the user query. Available functions:\n"
            f"{specs}\nTo call a function, reply with <tool_call>{{\"name\": <function-name>, "
            "\"arguments\": <args-json-object>}</tool_call> and nothing else.")


def template_supports_tools(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


def family_for(architecture: str) -> str:
    return "qwen" if architecture.startswith("Qwen") else "llama3"


def parse_tool_calls(text: str, tools: list[Tool], family: str) -> tuple[str | None, list[ToolCall]]:
    """(remaining content or None, calls). Calls must name an offered tool; otherwise the text is
    returned as plain content."""
    names = {t.name for t in tools}
    calls: list[ToolCall] = []
    if family == "qwen" and "<tool_call>" in text:
        for raw in _QWEN_CALL.findall(text):
            call = _call_from(loads(raw), names)
            if call is None:
                return text, []
            calls.append(call)
        rest = _QWEN_CALL.sub("", text).strip()
        return (rest or None), calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    obj = loads(body)
    for item in (obj if isinstance(obj, list) else [obj]):
        call = _call_from(item, names)
        if call is None:
            return text, []
        calls.append(call)
    return (None, calls) if calls else (text, [])


def loads(text: str) -> Any:
    """JSON, or None where the text is not JSON."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def _call_from(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = loads(args)
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None
