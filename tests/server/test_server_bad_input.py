"""Bad inputs get a 4xx with an OpenAI-shaped error, and the server keeps serving."""
from __future__ import annotations

import httpx
import pytest

JSON = {"content-type": "application/json"}
BAD = {
    "malformed_json": ("/v1/completions", b'{"prompt": "hi", ', 400),
    "wrong_type": ("/v1/completions", b'{"prompt": "hi", "max_tokens": "many"}', 400),
    "missing_field": ("/v1/chat/completions", b'{"model": "tiny-llama"}', 400),
    "negative_max_tokens": ("/v1/completions", b'{"prompt": "hi", "max_tokens": -5}', 400),
    "unknown_model": ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
                      404),
    "prompt_over_context": ("/v1/completions", b'{"prompt": [' + b",".join([b"7"] * 600) + b'], "max_tokens": 2}',
                            400),
    "text_over_context": ("/v1/completions", b'{"prompt": "' + b"hello " * 700 + b'", "max_tokens": 2}', 400),
    "invalid_utf8": ("/v1/completions", b'{"prompt": "\xff\xfe\xfa", "max_tokens": 2}', 400),
    "lone_surrogate": ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', 400),
    "token_out_of_vocab": ("/generate", b'{"input_ids": [1, 99999999]}', 400),
    "negative_token": ("/generate", b'{"input_ids": [-1]}', 400),
    "empty_prompt": ("/v1/completions", b'{"prompt": ""}', 400),
    "nan_temperature": ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400),
    "top_p_zero": ("/v1/completions", b'{"prompt": "hi", "top_p": 0}', 400),
    "min_tokens_over_max": ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "min_tokens": 5}', 400),
    "empty_stop": ("/v1/completions", b'{"prompt": "hi", "stop": [""]}', 400),
    "too_many_logprobs": ("/v1/chat/completions",
                          b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 99}',
                          400),
    "bad_role": ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400),
    "suffix": ("/v1/completions", b'{"prompt": "hi", "suffix": "end"}', 400),
    "json_not_object": ("/v1/completions", b'[1, 2, 3]', 400),
    "detokenize_out_of_range": ("/detokenize", b'{"tokens": [10000000]}', 400),
    "abort_without_rid": ("/abort_request", b'{}', 400),
}


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as c:
        yield c


def assert_openai_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_4xx(http, case):
    path, body, status = BAD[case]
    assert_openai_error(http.post(path, content=body, headers=JSON), status)
    for stream in (False, True):   # streaming requests fail the same way, before the stream starts
        if path.startswith("/v1") and body.startswith(b'{"prompt": "hi"'):
            r = http.post(path, content=body[:-1] + b', "stream": true}' if stream else body, headers=JSON)
            assert r.status_code == status


def test_ten_megabyte_body_is_413(http):
    body = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    assert_openai_error(http.post("/v1/completions", content=body, headers=JSON), 413)


def test_unknown_route_and_method(http):
    assert_openai_error(http.get("/v1/nothing"), 404)
    assert_openai_error(http.delete("/v1/models"), 405)


def test_form_encoded_json_is_accepted(http):
    r = http.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


def test_still_serving_after_bad_inputs(http):
    for path, body, _ in BAD.values():
        http.post(path, content=body, headers=JSON)
    r = http.post("/v1/completions", json={"prompt": "still alive", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert http.get("/health").status_code == 200
    assert http.get("/get_server_info").json()["kv_leaked"] == 0
