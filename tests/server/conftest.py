"""Real servers on loopback: started as subprocesses on free ports, shared where tests don't break them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from rlserve.net import free_port

STARTUP_TIMEOUT_S = 240


class Server:
    """`python -m rlserve.server ...` on a free loopback port; `url`, `stop()`, `pid`, `log()`."""

    def __init__(self, args: list[str], log_dir: Path, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_dir / f"server-{self.port}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "rlserve.server", "--port", str(self.port), "--log-level", "warning", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def info(self) -> dict:
        r = httpx.get(self.url + "/get_server_info", headers=self.headers(), timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_until(self, condition: Callable[[dict], bool], what: str, timeout: float = 120) -> None:
        """Poll /get_server_info until `condition(info)`: a state to wait on instead of a sleep that a
        busy machine can outlast (the timeout only ends a hang)."""
        deadline = time.monotonic() + timeout
        while not condition(self.info()):
            assert time.monotonic() < deadline, f"never saw {what}:\n{self.log()}"
            time.sleep(0.05)

    def wait_for_requests(self, n: int) -> None:
        """Until the engine holds at least `n` requests (started client threads have really arrived)."""
        self.wait_until(lambda info: info["num_requests"] >= n, f"{n} request(s) in the engine")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


TINY_ARGS = ["--model", "tiny-llama", "--max-total-tokens", "16384", "--max-model-len", "512"]


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    """Start a server (call .wait_ready()); every server started is stopped at the end of the session."""
    started: list[Server] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def make(args: list[str], api_key: str | None = None) -> Server:
        s = Server(args, log_dir, api_key)
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def tiny_args(default_model_dir) -> list[str]:
    """Server flags for the tiny random model (it borrows the default model's tokenizer)."""
    return list(TINY_ARGS)


@pytest.fixture(scope="session")
def tiny_server(server_factory, default_model_dir) -> Server:
    """A tiny random model: fast enough for load, bad-input and schema tests."""
    return server_factory(TINY_ARGS).wait_ready()


@pytest.fixture(scope="session")
def default_server(server_factory, default_model_dir) -> Server:
    """The default SmolLM2 model, for tests that need meaningful text and chat templates."""
    return server_factory(["--max-total-tokens", "16384", "--max-model-len", "2048"]).wait_ready()


@pytest.fixture(scope="session")
def client(default_server):
    """The official openai client against the default-model server."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def model(client) -> str:
    return client.models.list().data[0].id


def assert_served_matches_local(served: list[dict], local: list) -> None:
    """Each /generate item (asked with return_logprob and top_logprobs_num) has the local RequestOutput's
    greedy tokens, and their logprobs, top ones included, within 1e-4."""
    for s, loc in zip(served, local, strict=True):
        out = loc.outputs[0]
        assert s["output_ids"] == out.token_ids
        got = s["meta_info"]["output_token_logprobs"]
        assert [t for _, t, _ in got] == out.token_ids
        for (lp, tok, _), ref in zip(got, out.logprobs):
            assert abs(lp - ref[tok]) <= 1e-4, (lp, ref[tok])
        for top, ref in zip(s["meta_info"]["output_top_logprobs"], out.logprobs):
            for lp, tok, _ in top:
                assert tok in ref and abs(lp - ref[tok]) <= 1e-4
