"""The official openai client against a real server running the default model."""
from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def tiny(tiny_server):
    """The tiny random model: sampling behaviour, not text quality, so speed wins."""
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model] and model == "SmolLM2-135M-Instruct"


def test_greedy_matches_offline_llm(client, model):
    from rlserve.llm import LLM
    from rlserve.sampling import SamplingParams

    llm = LLM(max_total_tokens=4096, max_model_len=2048)
    params = SamplingParams(temperature=0, max_tokens=8)
    offline = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    served = client.completions.create(model=model, prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(served.choices, key=lambda c: c.index)] == [o.text for o in offline]
    assert served.usage.completion_tokens == sum(len(o.token_ids) for o in offline)

    chat_offline = llm.chat(CHAT, params, use_tqdm=False)[0].outputs[0]
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == chat_offline.text
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == chat_offline.finish_reason


def test_chat_stream_equals_non_stream(client, model):
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_continuous_usage_counts_the_tokens_so_far(client, model):
    full = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    chunks = list(client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == full.usage.completion_tokens
    assert all(c.usage.prompt_tokens == full.usage.prompt_tokens for c in chunks)
    plain = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain if c.choices)


def test_completion_stream_equals_non_stream(client, model):
    full = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text


def test_n_and_seed_reproducibility(tiny):
    model = "tiny-llama"

    def sample(seed: int):
        r = tiny.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=1.0,
                                           n=2, seed=seed)
        assert [c.index for c in r.choices] == [0, 1]
        return [c.message.content for c in r.choices]

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c
    assert a[0] != a[1]   # the two choices draw from different streams


def test_completion_n_with_several_prompts(tiny):
    model = "tiny-llama"
    r = tiny.completions.create(model=model, prompt=PROMPTS, max_tokens=4, n=2, temperature=1.0, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert 4 <= r.usage.completion_tokens <= 16


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs), abs=1e-5)


def test_completion_logprobs_and_echo(tiny):
    client, model = tiny, "tiny-llama"
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    echo = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPTS[0] + r.choices[0].text


def test_stop_and_penalties(client, model):
    base = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    text = base.choices[0].text
    stop = text.strip().split()[1] if len(text.split()) > 1 else text[:2]
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert text.startswith(r.choices[0].text)
    p = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                  presence_penalty=2.0, frequency_penalty=2.0)
    assert p.choices[0].text  # accepted and served


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-unknown", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_bad_request_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="hi", max_tokens=2, suffix="x")
    assert "suffix" in e.value.message


def test_response_format_json_schema(client, model):
    import json

    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green"]}},
              "required": ["colour"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Pick a colour as JSON."}], max_tokens=30,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert json.loads(r.choices[0].message.content)["colour"] in ("red", "green")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
