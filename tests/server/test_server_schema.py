"""/openapi.json describes the server; a bounded schemathesis run against it finds no 5xx."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("schemathesis")


def test_openapi_lists_the_routes(tiny_server):
    paths = httpx.get(tiny_server.url + "/openapi.json").json()["paths"]
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/generate", "/tokenize", "/detokenize",
              "/health", "/health_generate", "/get_model_info", "/get_server_info", "/abort_request",
              "/flush_cache", "/metrics", "/update_weights_from_disk", "/update_weights_from_tensor",
              "/update_weights_from_distributed", "/pause_generation", "/release_memory_occupation"):
        assert p in paths


def test_schemathesis_finds_no_server_errors(server_factory, tiny_args, tmp_path):
    # A short context keeps every generated request quick, whatever max_tokens it asks for. The admin
    # key keeps the fuzzer off the admin routes (pausing, releasing memory or waiting for a trainer at a
    # rendezvous would stall the rest): they answer 401, and test_admin_routes covers them.
    server = server_factory([*tiny_args, "--max-model-len", "64", "--admin-api-key", "not-sent"]).wait_ready()
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    run = subprocess.run(
        [st, "run", server.url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "5",
         "--max-time", "30", "--request-timeout", "60", "--generation-deterministic", "--no-color"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
    assert httpx.get(server.url + "/health").status_code == 200
    assert "Traceback" not in server.log()
