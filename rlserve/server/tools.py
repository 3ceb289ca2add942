"""OpenAI tool calling: validate `tools`, render them for the model, constrain forced calls with a
JSON schema, and parse calls out of generated text for the model families we know.

Formats understood in generated text:
- "qwen":   <tool_call>{"name": ..., "arguments": {...}}</tool_call> (one or more)
- "llama3": the whole reply is {"name": ..., "parameters"|"arguments": {...}} (optionally after
            <|python_tag|>), or a list of such objects
With tool_choice "required" or a named function the model is constrained to a bare JSON call
{"name": ..., "arguments": {...}}, which both parsers read.
"""
from __future__ import annotations

import re
from typing import Any

from rlserve.server.errors import APIError

# The parsers and types have no server dependencies (rlserve/tool_parsing.py; the RL agent loop uses
# them too); re-exported here for the routes.
from rlserve.tool_parsing import (
    FAMILIES,
    Tool,
    ToolCall,
    family_for,
    loads,
    parse_tool_calls,
    template_supports_tools,
    tools_system_prompt,
)

__all__ = ["FAMILIES", "Tool", "ToolCall", "family_for", "forced_call_schema", "loads",
           "messages_for_template", "parse_tool_calls", "parse_tools", "resolve_choice",
           "template_supports_tools", "tools_system_prompt"]


def parse_tools(tools: list[dict[str, Any]]) -> list[Tool]:
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise APIError(400, f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -", param="tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        out.append(Tool(name, str(fn.get("description") or ""), params))
    if len({t.name for t in out}) != len(out):
        raise APIError(400, "tool names must be unique", param="tools")
    return out


def resolve_choice(tools: list[Tool], choice: Any) -> tuple[str, list[Tool]]:
    """("none" | "auto" | "forced", the tools the model may call)."""
    if choice is None:
        return ("auto" if tools else "none"), tools
    if choice in ("none", "auto"):
        return choice, tools
    if choice == "required":
        if not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        return "forced", tools
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        picked = [t for t in tools if t.name == name]
        if not picked:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return "forced", picked
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                        "'function': {'name': ...}}", param="tool_choice")


def forced_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """A JSON schema every string of which is a call of one of `tools` with valid arguments."""
    def one(t: Tool) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}
    return one(tools[0]) if len(tools) == 1 else {"anyOf": [one(t) for t in tools]}


def messages_for_template(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI messages (incl. assistant tool_calls and role 'tool' results) as chat-template dicts."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(p.text for p in m.content)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _template_call(call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, "each assistant tool_calls entry needs function.name", param="messages")
    args = fn.get("arguments", "{}")
    parsed = loads(args) if isinstance(args, str) else args
    if not isinstance(parsed, dict):
        raise APIError(400, "tool_calls function.arguments must be a JSON object (as a string)", param="messages")
    return {"type": "function", "id": call.get("id"), "function": {"name": fn["name"], "arguments": parsed}}
