"""Auth, overload, SIGTERM drain and engine death, each against its own server."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def guarded_server(server_factory, tiny_args):
    """--api-key, and a waiting queue of 1 behind a single running slot, so overload is easy to reach."""
    return server_factory([*tiny_args, "--max-waiting-requests", "1", "--max-running-requests", "1"],
                          api_key=KEY).wait_ready()


def test_api_key(guarded_server):
    url = guarded_server.url
    assert guarded_server.info()["max_waiting_requests"] == 1    # the engine's limit, set by the flag
    assert httpx.get(url + "/health").status_code == 200          # open for load balancers
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"),
                             ("POST", "/generate"), ("GET", "/get_server_info")):
            r = httpx.request(method, url + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
    ok = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_openai_client_with_key(guarded_server):
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=guarded_server.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny-llama", prompt="hi", max_tokens=2).choices
    bad = openai.OpenAI(base_url=guarded_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_overload_is_503_and_recovers(guarded_server):
    url, headers = guarded_server.url, guarded_server.headers()
    results: list[int] = []

    def post() -> None:
        r = httpx.post(url + "/v1/completions", headers=headers, timeout=120,
                       json={"prompt": "flood", "max_tokens": 40, "ignore_eos": True})
        results.append(r.status_code)
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded"

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8 and set(results) <= {200, 503}
    assert 503 in results and 200 in results
    r = httpx.post(url + "/v1/completions", headers=headers, json={"prompt": "after", "max_tokens": 2})
    assert r.status_code == 200


def test_sigterm_drains_then_aborts_and_exits_0(server_factory):
    """A short request finishes during the drain; an endless one is cut off at --drain-timeout.
    The default model (the tiny one decodes thousands of tokens inside a drain window) and a wide
    margin both ways: on a busy 2-core machine the default model has taken 0.4-2 s a token, so the drain
    lasts 30 s for the short request; 8,000 tokens keep the endless one from ending by length inside it
    on an idle machine."""
    server = server_factory(["--max-model-len", "8192", "--max-total-tokens", "16384",
                             "--drain-timeout", "30"]).wait_ready()
    results: dict = {}

    def post(name: str, max_tokens: int) -> None:
        try:
            results[name] = httpx.post(server.url + "/v1/completions", timeout=300,
                                       json={"prompt": name, "max_tokens": max_tokens, "ignore_eos": True})
        except httpx.HTTPError as e:
            results[name] = e

    threads = [threading.Thread(target=post, args=("short", 8)), threading.Thread(target=post, args=("endless", 8000))]
    for t in threads:
        t.start()
    # Both requests have arrived: in the engine, or (the short one) already answered.
    server.wait_until(lambda info: info["num_requests"] + len(results) >= 2, "both requests arrive")
    server.proc.send_signal(signal.SIGTERM)
    # No new connections while draining: the listening socket closes once the signal is handled, and
    # the drain (the endless request runs until --drain-timeout) keeps the process alive meanwhile.
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(server.url + "/health", timeout=2)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            # refused, or (a probe that reached the backlog as the listener closed) reset unanswered
            break
        assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
        time.sleep(0.1)
    assert server.proc.poll() is None, "the server exited before draining"
    assert server.proc.wait(180) == 0
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    short = results["short"]
    assert isinstance(short, httpx.Response), short
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 8
    endless = results["endless"]   # answered with what it had, marked aborted
    assert endless.status_code == 200, endless
    assert endless.json()["choices"][0]["finish_reason"] == "abort"
    assert endless.json()["usage"]["completion_tokens"] < 8000


def test_engine_death_fails_fast(server_factory, tiny_args):
    server = server_factory(tiny_args).wait_ready()
    engine_pid = server.info()["engine_pid"]
    result: dict = {}

    def in_flight() -> None:
        result["r"] = httpx.post(server.url + "/v1/completions", timeout=300,
                                 json={"prompt": "doomed", "max_tokens": 400, "ignore_eos": True})

    t = threading.Thread(target=in_flight)
    t.start()
    server.wait_for_requests(1)
    os.kill(engine_pid, signal.SIGKILL)
    # Failing fast: the request is answered once the death is noticed, long before its own timeout
    # (the bounds are generous on purpose; the watcher looks every 0.25 s).
    t.join(60)
    assert not t.is_alive(), "the in-flight request was not failed when the engine died"
    assert result["r"].status_code == 503 and result["r"].json()["error"]["code"] == "engine_dead"
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health").status_code == 200:
        assert time.monotonic() < deadline, "/health still healthy after the engine died"
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").status_code == 503
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
    assert server.stop() == 0
