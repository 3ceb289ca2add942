"""/v1/embeddings (through the official client too), SGLang's /encode and /classify: results match
transformers in fp32, batched equals single, bad inputs get 400."""
from __future__ import annotations

import base64
import struct
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pooling"))
from pooling_models import hf_classify, hf_embedding, make_classifier  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there", "x " * 40]


def _close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


@pytest.fixture(scope="module")
def embed_server(server_factory, tiny_model_dir):
    path = tiny_model_dir("tiny-qwen3")
    return server_factory(["--model", str(path), "--dtype", "float32", "--max-model-len", "256",
                           "--chunked-prefill-size", "16"]).wait_ready(), path


@pytest.fixture(scope="module")
def cls_server(server_factory, tmp_path_factory, default_model_dir):
    path = make_classifier("tiny-llama", tmp_path_factory.mktemp("tiny-llama-cls"), default_model_dir)
    return server_factory(["--model", str(path), "--dtype", "float32", "--max-model-len", "256"]).wait_ready(), path


def _ids(server, text: str) -> list[int]:
    return httpx.post(server.url + "/tokenize", json={"text": text}).json()["tokens"]


def test_embeddings_match_transformers_batched_and_single(embed_server):
    server, path = embed_server
    r = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    ids = [_ids(server, t) for t in TEXTS]
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    for d, row in zip(body["data"], ids):
        assert _close(d["embedding"], hf_embedding(path, row, "last"))
    single = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS[0]}, timeout=60).json()
    assert _close(single["data"][0]["embedding"], body["data"][0]["embedding"])
    by_ids = httpx.post(server.url + "/v1/embeddings", json={"input": ids}, timeout=60).json()
    assert all(_close(a["embedding"], b["embedding"]) for a, b in zip(by_ids["data"], body["data"]))
    one_ids = httpx.post(server.url + "/v1/embeddings", json={"input": ids[1]}, timeout=60).json()
    assert _close(one_ids["data"][0]["embedding"], body["data"][1]["embedding"])


def test_embeddings_through_the_openai_client_with_base64(embed_server):
    openai = pytest.importorskip("openai")
    server, _ = embed_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    floats = client.embeddings.create(model=model, input=["a b c", "d e"], encoding_format="float")
    assert floats.data[1].index == 1 and len(floats.data[0].embedding) == 64
    raw = httpx.post(server.url + "/v1/embeddings", json={"input": ["a b c"], "encoding_format": "base64"}).json()
    vec = list(struct.unpack("<64f", base64.b64decode(raw["data"][0]["embedding"])))
    assert _close(vec, floats.data[0].embedding, 1e-6)
    # The client asks for base64 when no format is given and decodes it itself.
    default = client.embeddings.create(model=model, input="a b c")
    assert _close(default.data[0].embedding, floats.data[0].embedding, 1e-6)


def test_native_encode_shape(embed_server):
    server, path = embed_server
    one = httpx.post(server.url + "/encode", json={"text": TEXTS[1]}).json()
    assert set(one) == {"embedding", "meta_info"} and one["meta_info"]["prompt_tokens"] == len(_ids(server, TEXTS[1]))
    many = httpx.post(server.url + "/encode", json={"input_ids": [[5, 6, 7], [8, 9]]}).json()
    assert isinstance(many, list) and _close(many[1]["embedding"], hf_embedding(path, [8, 9], "last"))


@pytest.mark.parametrize("body", [
    {"input": ""}, {"input": []}, {"input": [[]]}, {"input": 3}, {"input": {"a": 1}}, {"input": [1, "a"]},
    {"input": [True, 2]}, {"input": "x " * 400}, {"input": [[10**9]]}, {"input": [-1]},
    {"input": "hi", "encoding_format": "int8"}, {"input": "hi", "dimensions": 8}, {},
])
def test_embeddings_bad_input_is_400(embed_server, body):
    server, _ = embed_server
    r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 400, (body, r.text)
    assert r.json()["error"]["message"]


def test_embeddings_server_refuses_classify_and_still_embeds(embed_server):
    server, _ = embed_server
    r = httpx.post(server.url + "/classify", json={"text": "hi"})
    assert r.status_code == 400 and "classification head" in r.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "hi"}).status_code == 200


def test_classify_matches_transformers(cls_server):
    server, path = cls_server
    many = httpx.post(server.url + "/classify", json={"text": TEXTS}, timeout=120)
    assert many.status_code == 200, many.text
    for item, text in zip(many.json(), TEXTS):
        assert _close(item["embedding"], hf_classify(path, _ids(server, text)))
        assert item["meta_info"]["prompt_tokens"] == len(_ids(server, text))
    one = httpx.post(server.url + "/classify", json={"input_ids": _ids(server, TEXTS[0])}).json()
    assert _close(one["embedding"], many.json()[0]["embedding"])
    gen = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert gen.status_code == 400 and "not generation" in gen.json()["error"]["message"]
    for bad in ({}, {"text": "a", "input_ids": [1]}, {"text": ""}, {"input_ids": "abc"}, {"text": ["a"], "rid": ["1", "2"]}):
        assert httpx.post(server.url + "/classify", json=bad).status_code == 400, bad


def test_model_info_says_whether_the_model_generates(embed_server, cls_server):
    assert httpx.get(embed_server[0].url + "/get_model_info").json()["is_generation"] is True
    assert httpx.get(cls_server[0].url + "/get_model_info").json()["is_generation"] is False
