"""Echo of token-id prompts, GET /v1/models/{id}, request validation, and the KV-usage metrics."""
from __future__ import annotations

import re

import httpx
import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def oai(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _decode(server, ids: list[int], skip: bool) -> str:
    return httpx.post(server.url + "/detokenize", json={"tokens": ids, "skip_special_tokens": skip}).json()["text"]


def test_echo_of_a_token_id_prompt_with_special_tokens(oai, tiny_server):
    words = httpx.post(tiny_server.url + "/tokenize", json={"text": "Hello world"}).json()["tokens"]
    prompt = [1, *words, 2]                 # <|im_start|> ... <|im_end|>: special tokens
    expected = _decode(tiny_server, prompt, skip=False)
    assert expected != _decode(tiny_server, prompt, skip=True)
    r = oai.completions.create(model="tiny-llama", prompt=prompt, echo=True, logprobs=1, max_tokens=6,
                               temperature=0)
    c = r.choices[0]
    assert c.text.startswith(expected)
    offsets = c.logprobs.text_offset
    assert len(offsets) == len(prompt) + 6
    assert offsets == sorted(offsets) and all(0 <= o <= len(c.text) for o in offsets)
    stream = oai.completions.create(model="tiny-llama", prompt=prompt, echo=True, max_tokens=6, temperature=0,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == c.text


def test_models_retrieve_and_root(oai, tiny_server):
    m = oai.models.retrieve("tiny-llama")
    assert m.id == "tiny-llama" and m.root == "tiny-llama"
    assert oai.models.list().data[0].root == "tiny-llama"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_models_root_of_the_default_model(client):
    (card,) = client.models.list().data
    assert card.root and client.models.retrieve(card.id).root == card.root


def test_max_tokens_beyond_the_context_is_a_400(oai):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        oai.completions.create(model="tiny-llama", prompt="hi", max_tokens=600)
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        oai.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                    max_completion_tokens=600)
    ok = oai.completions.create(model="tiny-llama", prompt="hi", max_tokens=8)
    assert ok.usage.completion_tokens == 8


def test_stream_options_without_stream_and_tool_choice_without_tools(oai):
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        oai.completions.create(model="tiny-llama", prompt="hi", max_tokens=2, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        oai.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    tool_choice="auto")


def test_regex_and_ebnf_in_openai_bodies(oai):
    r = oai.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=10, temperature=1.0, seed=2, extra_body={"regex": "[ab]{4}"})
    assert re.fullmatch("[ab]{4}", r.choices[0].message.content)
    r2 = oai.completions.create(model="tiny-llama", prompt="x", max_tokens=10, temperature=1.0, seed=2,
                                extra_body={"ebnf": 'root ::= "yes" | "no"'})
    assert r2.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError, match="one structured-output constraint"):
        oai.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    response_format={"type": "json_object"}, extra_body={"regex": "a"})


def test_unknown_fields_are_logged_once_per_name(oai, tiny_server):
    for _ in range(3):
        oai.completions.create(model="tiny-llama", prompt="x", max_tokens=1, extra_body={"frobnicate_level": 3})
    assert tiny_server.log().count("frobnicate_level") == 1


def test_nested_negative_token_id_names_the_id(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/completions", json={"prompt": [[1, 2], [3, -5]], "max_tokens": 1})
    assert r.status_code == 400
    assert "token id -5 is out of range" in r.json()["error"]["message"]


def _gauge(text: str, name: str) -> float:
    (value,) = re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(value)


def test_kv_usage_excludes_the_evictable_prefix_cache(oai, tiny_server):
    oai.completions.create(model="tiny-llama", prompt="a prompt long enough to leave a cached prefix " * 8,
                           max_tokens=4)
    tiny_server.wait_until(lambda info: info["num_running"] == 0 and info["num_waiting"] == 0, "an idle engine")
    info = tiny_server.info()
    assert info["tree_evictable_tokens"] > 0
    assert info["kv_used_ratio"] == 0 and info["kv_cached_ratio"] > 0
    text = httpx.get(tiny_server.url + "/metrics").text
    assert _gauge(text, "rlserve_kv_cache_usage_ratio") == 0
    assert _gauge(text, "rlserve_kv_cache_cached_ratio") == pytest.approx(info["kv_cached_ratio"])
