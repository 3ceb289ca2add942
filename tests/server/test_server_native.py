"""Native routes (/generate, /tokenize, /detokenize, health, info, abort, flush) and /metrics."""
from __future__ import annotations

import json
import threading

import httpx
import pytest


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as c:
        yield c


def sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_generate_text_and_ids_agree(http):
    tok = http.post("/tokenize", json={"text": "Hello there"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    sp = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    by_text = http.post("/generate", json={"text": "Hello there", "sampling_params": sp}).json()
    by_ids = http.post("/generate", json={"input_ids": tok["tokens"], "sampling_params": sp,
                                          "return_logprob": True, "top_logprobs_num": 2}).json()
    assert by_text["output_ids"] == by_ids["output_ids"] and len(by_ids["output_ids"]) == 6
    meta = by_ids["meta_info"]
    assert meta["prompt_tokens"] == tok["count"] and meta["completion_tokens"] == 6
    assert meta["finish_reason"]["type"] == "length" and meta["e2e_latency"] > 0
    assert [t for _, t, _ in meta["output_token_logprobs"]] == by_ids["output_ids"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    text = http.post("/detokenize", json={"tokens": by_ids["output_ids"], "skip_special_tokens": True}).json()
    assert text["text"] == by_ids["text"]


def test_generate_batch_and_stream(http):
    sp = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    batch = http.post("/generate", json={"text": ["a b c", "x y"], "sampling_params": sp}).json()
    assert isinstance(batch, list) and len(batch) == 2
    singles = [http.post("/generate", json={"text": t, "sampling_params": sp}).json() for t in ["a b c", "x y"]]
    assert [b["output_ids"] for b in batch] == [s["output_ids"] for s in singles]
    with http.stream("POST", "/generate", json={"text": "a b c", "sampling_params": sp, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[-2]["output_ids"] == singles[0]["output_ids"]   # cumulative
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"


def test_generate_n_returns_a_list(http):
    out = http.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 3, "n": 3, "seed": 5}})
    assert out.status_code == 200 and len(out.json()) == 3


def test_generate_rejects_both_or_neither(http):
    for body in ({}, {"text": "a", "input_ids": [1]}):
        r = http.post("/generate", json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_abort_request_by_rid(http, tiny_server):
    result: dict = {}

    def long_request() -> None:
        with httpx.Client(base_url=tiny_server.url, timeout=60) as c:
            result["r"] = c.post("/generate", json={"text": "go", "rid": "abort-me", "sampling_params": {
                "max_new_tokens": 500, "ignore_eos": True}})

    t = threading.Thread(target=long_request)
    t.start()
    tiny_server.wait_for_requests(1)
    assert http.post("/abort_request", json={"rid": "abort-me"}).status_code == 200
    t.join(60)
    body = result["r"].json()
    assert body["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(body["output_ids"]) < 500


def test_health_info_and_flush(http):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    mi = http.get("/get_model_info").json()
    assert mi["max_model_len"] == 512 and mi["is_generation"] and mi["vocab_size"] == 49152
    r = http.post("/flush_cache")
    assert r.status_code == 200 and r.json()["success"]
    info = http.get("/get_server_info").json()
    assert info["kv_leaked"] == 0 and info["tree_tokens"] == 0 and info["weight_version"] == "default"
    assert info["kv_available"] == info["kv_total"]


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move(http):
    before = http.get("/metrics").text
    http.post("/generate", json={"text": "count me", "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}})
    after = http.get("/metrics").text
    assert _metric(after, "rlserve_generation_tokens_total") - _metric(before, "rlserve_generation_tokens_total") >= 5
    assert _metric(after, "rlserve_prompt_tokens_total") > _metric(before, "rlserve_prompt_tokens_total")
    assert _metric(after, "rlserve_requests_total") > _metric(before, "rlserve_requests_total")
    assert _metric(after, "rlserve_time_to_first_token_seconds_count") > \
        _metric(before, "rlserve_time_to_first_token_seconds_count")
    for name in ("rlserve_num_requests_running", "rlserve_num_requests_waiting", "rlserve_kv_cache_usage_ratio",
                 "rlserve_prefix_cache_hit_rate", "rlserve_inter_token_latency_seconds_bucket",
                 "rlserve_e2e_request_latency_seconds_bucket"):
        assert name in after


def test_server_info_counts_engine_steps_and_loop_time(http):
    """/get_server_info reports the engine's step counters and the engine loop's host time."""
    before = http.get("/get_server_info").json()
    http.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True,
                                                                              "temperature": 0}})
    after = http.get("/get_server_info").json()
    steps = {k: after["stats"][k] - before["stats"][k] for k in ("prefill_steps", "decode_steps")}
    assert steps["prefill_steps"] >= 1 and steps["decode_steps"] >= 3
    loop_steps = after["loop"]["loop_steps"] - before["loop"]["loop_steps"]
    assert loop_steps >= steps["prefill_steps"] + steps["decode_steps"] - 1 >= 3
    assert after["loop"]["step_s"] > before["loop"]["step_s"]
    assert after["loop"]["send_s"] > before["loop"]["send_s"]
    assert after["stats"]["device_wait_s"] >= 0.0
