"""rlserve.client: bucketing, errors, and the async client against a real server (tiny model)."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from rlserve.client import AsyncClient, Client, ServerError, _buckets
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
