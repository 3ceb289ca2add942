"""`rlserve bench serving` against a server that has nothing but the OpenAI routes: a stub with only
/v1/completions (streamed as OpenAI streams it: server-sent events, a usage chunk at the end when asked,
then [DONE]) and /v1/models. Prompt ids come from --vocab-size or --tokenizer, the flush is skipped with
a note, and the counts come out as for rlserve."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from benchmarks.router_standin import ServedApp
from rlserve.bench.serving_workload import random_requests
from rlserve.cli import main

uvicorn = pytest.importorskip("uvicorn")
fastapi = pytest.importorskip("fastapi")


def stub_app(seen: list[dict], answered: list[tuple[str, int]]) -> fastapi.FastAPI:
    from fastapi.responses import StreamingResponse

    app = fastapi.FastAPI()

    @app.middleware("http")
    async def record(request: fastapi.Request, call_next):
        response = await call_next(request)
        answered.append((request.url.path, response.status_code))
        return response

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0,
                                            "owned_by": "stub"}]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request) -> StreamingResponse:
        body = await request.json()
        seen.append(body)
        n, prompt = body["max_tokens"], body["prompt"]
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            for i in range(n):
                chunk = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": body.get("model"),
                         "choices": [{"index": 0, "text": "x", "logprobs": None,
                                      "finish_reason": "length" if i == n - 1 else None}]}
                if with_usage:
                    chunk["usage"] = None
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.002)
            if with_usage:
                usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
                last = {"id": "cmpl-stub", "object": "text_completion", "choices": [], "usage": usage}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class StubServer(ServedApp):
    """The stub app served by uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self) -> None:
        self.seen: list[dict] = []                        # every completion request's body
        self.answered: list[tuple[str, int]] = []         # (path, status) of every request
        # generous: a busy machine starts it slowly
        super().__init__(stub_app(self.seen, self.answered), start_timeout_s=120)


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


def _run(stub: StubServer, tmp_path, *flags: str) -> tuple[int, dict | None]:
    out = tmp_path / "serving.jsonl"
    rc = main(["bench", "serving", "--base-url", stub.url, "--no-tqdm", "--json-out", str(out), *flags])
    return rc, (json.loads(out.read_text().splitlines()[-1]) if out.exists() else None)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_server_with_only_the_openai_routes_is_measured(stub, tmp_path, capsys, processes):
    flags = ["--vocab-size", "500", "--num-prompts", "6", "--input-len", "8:16", "--output-len", "3:7",
             "--seed", "2", "--warmup", "2", "--flush-cache", "--max-concurrency", "4",
             "--client-processes", str(processes)]
    rc, rec = _run(stub, tmp_path, *flags)
    err = capsys.readouterr().err
    assert rc == 0
    assert "no /flush_cache route" in err
    expected = random_requests(6, (8, 16), (3, 7), vocab_size=500, seed=2)
    assert rec["num_requests"] == rec["completed"] == 6 and rec["failed"] == 0
    assert rec["total_output_tokens"] == rec["requested_output_tokens"] == sum(r.output_len for r in expected)
    assert rec["total_input_tokens"] == sum(len(r.prompt) for r in expected)
    assert rec["itl"]["count"] == rec["total_output_tokens"] - rec["completed"]
    assert rec["ttft"]["count"] == rec["e2e"]["count"] == 6
    assert rec["server"]["vocab_size"] == 500 and rec["server"]["served_model_name"] == "stub-model"
    assert rec["server"]["cache_flushed"] is False and "kv_leaked" not in rec["server"]

    # The warm-up's two requests and the run's six; all sent with the model the server lists, every id
    # drawn below --vocab-size.
    assert len(stub.seen) == 2 + 6
    assert all(body["model"] == "stub-model" and body["stream"] for body in stub.seen)
    assert all(0 <= t < 500 for body in stub.seen for t in body["prompt"])
    assert sorted(len(body["prompt"]) for body in stub.seen[2:]) == sorted(len(r.prompt) for r in expected)
    # rlserve's own routes were asked for and missing; only the OpenAI routes answered.
    ok = {path for path, status in stub.answered if status == 200}
    assert ok == {"/v1/models", "/v1/completions"}
    assert {"/get_model_info", "/flush_cache"} <= {path for path, status in stub.answered if status in (404, 405)}


def test_a_tokenizer_gives_the_vocabulary(stub, tmp_path, default_model_dir):
    from transformers import AutoTokenizer

    rc, rec = _run(stub, tmp_path, "--tokenizer", str(default_model_dir), "--num-prompts", "3",
                   "--input-len", "5", "--output-len", "2")
    vocab = len(AutoTokenizer.from_pretrained(str(default_model_dir)))
    assert rc == 0 and rec["completed"] == 3 and rec["server"]["vocab_size"] == vocab
    assert all(0 <= t < vocab for body in stub.seen for t in body["prompt"])


def test_without_a_vocabulary_the_run_stops_with_a_usage_error(stub, tmp_path, capsys):
    rc, rec = _run(stub, tmp_path, "--num-prompts", "2")
    assert rc == 2 and rec is None
    assert "--vocab-size" in capsys.readouterr().err
    assert stub.seen == []
