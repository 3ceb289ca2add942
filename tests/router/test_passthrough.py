"""The OpenAI routes and /generate answer the same through the router as from a worker directly,
streaming and not (the openai client on both)."""
from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module", params=["direct", "router"])
def base(request, dp) -> str:
    return dp.worker_urls[0] if request.param == "direct" else dp.router_url


@pytest.fixture(scope="module")
def oai(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_completion(oai):
    r = oai.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny-llama"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.choices[0].text


def test_completion_stream(oai):
    chunks = list(oai.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat(oai):
    r = oai.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=6, temperature=0, n=2)
    assert len(r.choices) == 2 and all(c.message.role == "assistant" for c in r.choices)
    assert r.usage.completion_tokens == 12


def test_chat_stream(oai):
    chunks = list(oai.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_generate(base):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 5, "temperature": 0}, "return_logprob": True}
    r = httpx.post(base + "/generate", json=body, timeout=120).json()
    assert r["meta_info"]["completion_tokens"] == 5 and len(r["output_ids"]) == 5
    assert len(r["meta_info"]["output_token_logprobs"]) == 5


def test_generate_token_ids_batch(base):
    body = {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    r = httpx.post(base + "/generate", json=body, timeout=120).json()
    assert [len(item["output_ids"]) for item in r] == [3, 3]


def test_generate_stream(base):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 5, "temperature": 0}, "stream": True}
    events = []
    with httpx.stream("POST", base + "/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert events and events[-1]["meta_info"]["completion_tokens"] == 5


def test_router_answers_as_the_worker(dp):
    """Greedy answers through the router equal the worker's own (every worker holds the same model)."""
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    direct = httpx.post(dp.worker_urls[1] + "/generate", json=body, timeout=120).json()
    routed = httpx.post(dp.router_url + "/generate", json=body, timeout=120).json()
    assert routed["output_ids"] == direct["output_ids"] and routed["text"] == direct["text"]
