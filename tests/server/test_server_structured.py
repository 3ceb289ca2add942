"""Structured output through the official openai client: response_format on chat and completions."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from structured_schemas import SCHEMAS


def test_every_schema_validates_through_chat(client, model):
    def ask(item):
        i, (name, schema) = item
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Give an example JSON value ({name})."}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            temperature=1.0, seed=i, max_tokens=200)
        return name, r.choices[0]
    with ThreadPoolExecutor(16) as pool:        # concurrent, so the engine batches them
        results = list(pool.map(ask, enumerate(SCHEMAS.items())))
    assert len(results) >= 15
    for name, choice in results:
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_completions_accept_response_format(client, model):
    schema = SCHEMAS["number_bounds"]
    r = client.completions.create(model=model, prompt="A JSON score report:", max_tokens=80, temperature=1.0,
                                  seed=2, extra_body={"response_format": {"type": "json_schema",
                                                                          "json_schema": {"schema": schema}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_grammar_that_fails_to_compile_is_a_400(client, model):
    bad = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       response_format={"type": "json_schema", "json_schema": {"schema": bad}})
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content is not None
