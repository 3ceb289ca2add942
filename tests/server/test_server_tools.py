"""Tool calling on /v1/chat/completions through the official client: forced calls always parse and
validate, "auto" is well-formed either way, streaming assembles to the same result."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from rlserve.server import tools as tool_lib

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "b": {"type": "integer", "minimum": -1000, "maximum": 1000}}, "required": ["a", "b"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What's the weather in Paris? Also, what is 2 + 40?"}]


def check_calls(message, allowed: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice, allowed", [
    ("required", {"get_weather", "add"}),
    ({"type": "function", "function": {"name": "add"}}, {"add"}),
])
def test_forced_tool_calls_always_parse_and_validate(client, model, choice, allowed):
    r = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                       n=6, temperature=1.0, seed=7, max_tokens=120)
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        check_calls(c.message, allowed)


def test_auto_gives_a_message_or_a_call(client, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="auto",
                                       n=4, temperature=1.0, seed=3, max_tokens=80)
    for c in r.choices:
        if c.message.tool_calls:
            check_calls(c.message, {"get_weather", "add"})
            assert c.finish_reason == "tool_calls"
        else:
            assert isinstance(c.message.content, str) and c.finish_reason in ("stop", "length")


def test_streamed_tool_calls_assemble_to_the_same_result(client, model):
    kw = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0,
              seed=11, max_tokens=120)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
           [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]


def test_tool_results_continue_the_conversation(client, model):
    first = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           temperature=0, max_tokens=60).choices[0].message
    call = first.tool_calls[0]
    messages = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                           {"role": "tool", "tool_call_id": call.id, "content": "42"}]
    r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=20)
    assert isinstance(r.choices[0].message.content, str) and not r.choices[0].message.tool_calls


@pytest.mark.parametrize("kw", [
    dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
    dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "missing"}}),
    dict(tool_choice="required"),
    dict(tools=[WEATHER, WEATHER]),
])
def test_bad_tool_requests_are_400(client, model, kw):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, **kw)


def test_parsers():
    offered = tool_lib.parse_tools(TOOLS)
    qwen = 'Sure.<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    content, calls = tool_lib.parse_tool_calls(qwen, offered, "qwen")
    assert content == "Sure." and calls == [tool_lib.ToolCall("add", {"a": 1, "b": 2})]
    llama = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}'
    assert tool_lib.parse_tool_calls(llama, offered, "llama3")[1][0].name == "get_weather"
    # Unknown names or broken JSON stay plain text.
    assert tool_lib.parse_tool_calls('{"name": "rm", "arguments": {}}', offered, "llama3") == \
           ('{"name": "rm", "arguments": {}}', [])
    assert tool_lib.parse_tool_calls("<tool_call>{oops</tool_call>", offered, "qwen")[1] == []


@pytest.mark.parametrize("calls", [[{}], [{"function": {"arguments": "{}"}}], [{"function": {"name": "add", "arguments": "[1]"}}]])
def test_malformed_assistant_tool_calls_are_400(client, model, calls):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, max_tokens=3, messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls}])
