"""Streaming with n > 1 through the official openai client and httpx: one choice a chunk, and exactly one
finish chunk per choice (chat, completions, /generate)."""
from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def oai(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def stop_ids(tiny_server) -> list[int]:
    """Every 16th token id: a near-uniform random model stops on one within a few dozen tokens, so the
    choices of a request end at different steps."""
    vocab = httpx.get(tiny_server.url + "/get_model_info").json()["vocab_size"]
    return list(range(3, vocab, 16))


def _check(chunks: list, n: int) -> None:
    finishes: Counter[int] = Counter()
    for c in chunks:
        assert len(c.choices) == 1, c
        if c.choices[0].finish_reason is not None:
            finishes[c.choices[0].index] += 1
    assert finishes == Counter({i: 1 for i in range(n)})


def test_chat_stream_n_one_choice_per_chunk_one_finish_each(oai, stop_ids):
    stream = oai.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "count"}], n=4, stream=True,
        temperature=1.0, seed=3, max_tokens=60, extra_body={"stop_token_ids": stop_ids})
    chunks = list(stream)
    _check(chunks, 4)
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2, 3]


def test_completions_stream_n_and_prompts(oai, stop_ids):
    stream = oai.completions.create(model="tiny-llama", prompt=["one two", "three"], n=3, stream=True,
                                    temperature=1.0, seed=5, max_tokens=60, extra_body={"stop_token_ids": stop_ids})
    _check(list(stream), 6)


def test_generate_stream_n_one_finish_each(tiny_server, stop_ids):
    body = {"text": "hello", "stream": True,
            "sampling_params": {"n": 3, "temperature": 1.0, "seed": 7, "max_new_tokens": 60,
                                "stop_token_ids": stop_ids}}
    finishes: Counter[int] = Counter()
    with httpx.stream("POST", tiny_server.url + "/generate", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            item = json.loads(line[6:])
            if item["meta_info"]["finish_reason"] is not None:
                finishes[item["index"]] += 1
    assert finishes == Counter({0: 1, 1: 1, 2: 1})
