"""rlserve.client: bucketing, errors, and the async client against a real server (tiny model)."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from rlserve.client import DEFAULT_BUCKET_BYTES, AsyncClient, Client, ServerError, _buckets, tensor_bucket_bytes
from tests.server.conftest import TINY_ARGS, Server

PARAM = "model.layers.0.mlp.down_proj.weight"


def test_import_stays_light():
    code = "import sys, rlserve, rlserve.client; print('httpx' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_buckets_cut_at_the_byte_limit():
    pairs = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([4, 4, 10, 1])]   # fp32: 16, 16, 40, 4 bytes
    assert [[n for n, _ in b] for b in _buckets(pairs, 32)] == [["t0", "t1"], ["t2"], ["t3"]]
    assert [[n for n, _ in b] for b in _buckets(pairs, None)] == [["t0", "t1", "t2", "t3"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    s = Server([*TINY_ARGS, "--admin-api-key", "k"], tmp_path_factory.mktemp("client-logs")).wait_ready()
    yield s
    s.stop()


def test_tensor_updates_split_only_flattened_buckets_by_default():
    # Direct handles copy nothing on the sender, so "auto" sends them in one call; a flattened bucket is a
    # copy the sender holds, so "auto" bounds it.
    pairs = [(f"w{i}", torch.zeros(1 << 18)) for i in range(6)]      # 1 MiB each
    assert tensor_bucket_bytes(None, "auto") is None
    assert len(_buckets(pairs, tensor_bucket_bytes(None, "auto"))) == 1
    assert tensor_bucket_bytes("flattened_bucket", "auto") == DEFAULT_BUCKET_BYTES
    assert len(_buckets(pairs, tensor_bucket_bytes("flattened_bucket", 2 << 20))) == 3
    assert tensor_bucket_bytes(None, 3 << 20) == 3 << 20 and tensor_bucket_bytes("flattened_bucket", None) is None


def test_sync_client_errors(server):
    with Client(server.url) as c:
        assert c.health() is True
        with pytest.raises(ServerError) as e:
            c.pause_generation()               # no admin key
        assert e.value.status == 401 and "admin key" in str(e.value)


def test_async_client(server):
    async def main() -> None:
        async with AsyncClient(server.url, admin_api_key="k", timeout=300) as c:
            info = await c.get_model_info()
            assert info["weight_version"] == "default"
            assert (await c.update_weight_version("a1"))["new_version"] == "a1"
            out = await c.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 3, "temperature": 0})
            assert len(out["output_ids"]) == 3 and out["meta_info"]["weight_version"] == "a1"
            chat = await c.chat(messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert chat["weight_version"] == "a1"
            shape = torch.tensor(await c.get_weights_by_name(PARAM, truncate_size=1 << 20)).shape
            new = torch.randn(shape)
            res = await c.update_weights_from_tensor([(PARAM, new)], weight_version="a2")
            assert res["success"] and (await c.get_server_info())["weight_version"] == "a2"
            assert torch.equal(torch.tensor(await c.get_weights_by_name(PARAM, truncate_size=1 << 20)), new)
            assert (await c.pause_generation("retract"))["success"]
            assert (await c.continue_generation())["success"]
            assert (await c.flush_cache())["success"]
    asyncio.run(main())


GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def test_stream_generate_matches_non_streaming(server):
    with Client(server.url) as c:
        whole = c.generate(input_ids=[1, 2, 3], sampling_params=GREEDY)
        chunks = list(c.stream_generate(input_ids=[1, 2, 3], sampling_params=GREEDY))
    assert len(chunks) > 1                                 # cumulative items, one per step (or merged steps)
    assert chunks[-1]["text"] == whole["text"] and chunks[-1]["output_ids"] == whole["output_ids"]
    assert all(ch["meta_info"]["finish_reason"] is None for ch in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_stream_openai_matches_non_streaming(server):
    with Client(server.url) as c:
        body = {"model": "tiny-llama", "prompt": "hello there", "max_tokens": 10, "temperature": 0,
                "ignore_eos": True}
        whole = c.completions(**body)
        chunks = list(c.stream_completions(**body))
        assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == whole["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"

        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        whole = c.chat(**chat)
        chunks = list(c.stream_chat(**chat))
        content = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        assert content == whole["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_errors_raise_server_error(server):
    with Client(server.url) as c, pytest.raises(ServerError) as e:
        next(c.stream_chat(messages=[{"role": "user", "content": "hi"}], max_tokens=-1))
    assert e.value.status == 400


def _idle(info: dict) -> bool:
    return info["num_requests"] == 0 and info["frontend_in_flight"] == 0


def test_stream_closed_early_aborts(server):
    long = {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}
    with Client(server.url) as c:
        gen = c.stream_generate(input_ids=[1, 2, 3], sampling_params=long)
        first = next(gen)
        assert first["meta_info"]["finish_reason"] is None
        gen.close()
        server.wait_until(_idle, "no requests after a closed stream", timeout=60)
        assert len(c.generate(input_ids=[4, 5], sampling_params=GREEDY)["output_ids"]) == 12

    async def main() -> None:
        async with AsyncClient(server.url) as c:
            agen = c.stream_chat(messages=[{"role": "user", "content": "hi"}], max_tokens=400, ignore_eos=True)
            async for chunk in agen:
                assert chunk["object"] == "chat.completion.chunk"
                break
            await agen.aclose()
            await asyncio.to_thread(server.wait_until, _idle, "no requests after a closed async stream", 60)
            chunks = [ch async for ch in c.stream_completions(prompt="a", max_tokens=3, temperature=0)]
            assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    asyncio.run(main())
