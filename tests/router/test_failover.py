"""A worker that dies: taken out of rotation without a client seeing a 5xx, restarted by the supervisor
and back in the router. And `rlserve serve --dp 2` as a command: one SIGTERM drains and stops it all."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx
from conftest import TINY_FLAGS, wait_for

from rlserve.net import free_port


def _ask(url: str, i: int) -> int:
    body = {"text": f"request number {i} about foxes", "sampling_params": {"max_new_tokens": 2}}
    return httpx.post(url + "/generate", json=body, timeout=120).status_code


def _health(router_url: str) -> dict[str, bool]:
    workers = httpx.get(router_url + "/workers", timeout=30).json()["workers"]
    return {w["url"]: w["is_healthy"] for w in workers}


def test_dead_worker_is_dropped_restarted_and_readded(supervised, router_factory):
    dp = supervised
    watcher = router_factory(policy="round_robin")        # no supervisor: its own health checks only
    victim = dp.workers[2]
    victim.process.kill()
    codes = []
    i = 0
    # until both routers have taken the dead worker out, every request still succeeds
    while _health(dp.router_url).get(victim.url) or _health(watcher.url).get(victim.url):
        codes += [_ask(dp.router_url, i), _ask(watcher.url, i)]
        i += 1
        assert i < 2000, "the dead worker was never taken out"
    codes += [_ask(dp.router_url, i), _ask(watcher.url, i)]
    assert set(codes) == {200}, codes
    # the supervisor restarts it on the same port and adds it back; the health checks readmit it
    wait_for(lambda: victim.state == "up" and victim.restarts == 1 and _health(dp.router_url).get(victim.url),
             "the worker back in the supervised router")
    wait_for(lambda: bool(_health(watcher.url).get(victim.url)), "the worker healthy again in the other router")
    assert _ask(victim.url, 0) == 200
    assert set(_health(dp.router_url).values()) == {True} and len(_health(dp.router_url)) == 3


def test_serve_dp_command_drains_on_sigterm(tmp_path, default_model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "rlserve.cli", "serve", "--dp", "2", "--port", str(port), "--log-dir",
           str(tmp_path), "--router-health-check-interval", "1", *TINY_FLAGS,
           # after TINY_FLAGS' 5 s, which a loaded machine can pass mid-request: what is tested is that the
           # request drains, not how fast
           "--drain-timeout", "120"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                h = _health(url)
            except httpx.HTTPError:
                return False
            return len(h) == 2 and all(h.values())
        wait_for(up, "two healthy workers behind the router", timeout=300)
        worker_urls = list(_health(url))
        result: dict[str, object] = {}

        def long_request() -> None:
            body = {"text": "a long story", "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
            r = httpx.post(url + "/generate", json=body, timeout=120)
            result["status"], result["body"] = r.status_code, r.json()
        t = threading.Thread(target=long_request)
        t.start()
        wait_for(lambda: any(httpx.get(u + "/get_server_info", timeout=30).json()["num_requests"]
                             for u in worker_urls), "the request in a worker")
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["status"] == 200
        assert result["body"]["meta_info"]["completion_tokens"] == 200      # drained, not cut
        assert proc.wait(180) == 0
        for u in [url, *worker_urls]:                                        # nothing left listening
            try:
                httpx.get(u + "/health", timeout=5)
                raise AssertionError(f"{u} still answers")
            except httpx.ConnectError:
                pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
