"""logit_bias (applied in every sampling mode, before grammar masks; ids checked against the vocabulary),
stop_token_ids out of range, json_object constrained to an object, and completions' legacy logprobs."""
from __future__ import annotations

import httpx
import pytest
import torch

from rlserve.engine.sampler import Sampler, SampleRow
from rlserve.sampling import SamplingParams

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def oai(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def vocab(tiny_server) -> int:
    return httpx.get(tiny_server.url + "/get_model_info").json()["vocab_size"]


def _ids(server, text: str) -> list[int]:
    return httpx.post(server.url + "/tokenize", json={"text": text}).json()["tokens"]


def _text(server, ids: list[int]) -> str:
    return httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["text"]


def test_greedy_output_follows_a_large_bias(oai, tiny_server):
    (tok,) = _ids(tiny_server, " apple")
    plain = oai.completions.create(model="tiny-llama", prompt="Once", max_tokens=4, temperature=0)
    biased = oai.completions.create(model="tiny-llama", prompt="Once", max_tokens=4, temperature=0,
                                    logit_bias={str(tok): 100})
    assert plain.choices[0].text != _text(tiny_server, [tok] * 4)
    assert biased.choices[0].text == _text(tiny_server, [tok] * 4)


def test_sampled_tokens_stay_within_positively_biased_ones(oai, tiny_server):
    a, b = _ids(tiny_server, " apple")[0], _ids(tiny_server, " pear")[0]
    r = oai.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "fruit"}], n=4,
                                    max_tokens=8, temperature=1.0, seed=1, logit_bias={str(a): 100, str(b): 100})
    for c in r.choices:
        assert _ids(tiny_server, c.message.content) and set(_ids(tiny_server, c.message.content)) <= {a, b}


@pytest.mark.parametrize("filters", [{}, {"top_k": 50}, {"top_p": 0.9}, {"temperature": 0.0}])
def test_sampler_never_picks_a_minus_100_token(filters):
    """On the CPU paths (greedy, unfiltered inverse CDF, filtered sort): a token that dominates the logits
    is never drawn once biased by -100, and a row without a bias in the same batch still takes it."""
    V = 64
    logits = torch.zeros(6, V)
    logits[:, 5] = 30.0
    params = {"temperature": 1.0, **filters}
    rows = [SampleRow(SamplingParams(**params, logit_bias={5: -100}), None) for _ in range(5)]
    rows.append(SampleRow(SamplingParams(**params), None))
    sampler = Sampler(seed=0)
    for _ in range(50):
        ids = sampler(logits, rows).token_ids
        assert 5 not in ids[:5] and ids[5] == 5


def test_logit_bias_is_in_range(oai, vocab):
    with pytest.raises(openai.BadRequestError, match=rf"{vocab + 3}.*{vocab}"):
        oai.completions.create(model="tiny-llama", prompt="x", max_tokens=2, logit_bias={str(vocab + 3): 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oai.completions.create(model="tiny-llama", prompt="x", max_tokens=2, logit_bias={"5": 101})
    with pytest.raises(openai.BadRequestError, match=rf"{vocab}.*{vocab}"):
        oai.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                    extra_body={"stop_token_ids": [vocab]})


def test_json_object_is_an_object_even_when_pushed_to_an_array(oai, tiny_server):
    (bracket,) = _ids(tiny_server, "[")
    r = oai.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "json"}],
                                    max_tokens=30, temperature=0, response_format={"type": "json_object"},
                                    logit_bias={str(bracket): 100})
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_completion_logprobs_always_hold_the_sampled_token(oai):
    r = oai.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=12, temperature=1.0, seed=4,
                               logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 12
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert list(top) == [tok]
    r = oai.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=16, temperature=1.0, seed=4,
                               logprobs=2)
    lp = r.choices[0].logprobs
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok in top and top[tok] == tlp and 2 <= len(top) <= 3
