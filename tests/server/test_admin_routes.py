"""The admin routes on a real server (tiny model, CPU): weights from disk, tensors and a gloo group,
weight versions, memory, pause modes, profiling, and who may call them."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import torch

from rlserve.client import Client, ServerError
from rlserve.net import free_port
from tests.conftest import hf_greedy
from tests.server.conftest import TINY_ARGS

ADMIN = "admin-secret"
PROMPT = [1, 422, 3459, 314, 4915, 28, 5230]
PARAM = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def server(server_factory, default_model_dir, profile_dir):
    return server_factory([*TINY_ARGS, "--admin-api-key", ADMIN, "--profile-dir", str(profile_dir)]).wait_ready()


@pytest.fixture(scope="module")
def admin(server):
    with Client(server.url, admin_api_key=ADMIN, timeout=300) as c:
        yield c


def greedy(c: Client, n: int = 12) -> list[int]:
    out = c.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
    return out["output_ids"]


def status(err: pytest.ExceptionInfo[ServerError]) -> int:
    return err.value.status


# ---- who may call ----
def test_admin_key_enforced(server, admin):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/continue_generation", headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_admin_api_key"
    assert httpx.post(server.url + "/flush_cache", timeout=30).status_code == 401
    assert httpx.post(server.url + "/abort_request", json={"abort_all": True}, timeout=30).status_code == 401
    # Generation needs no key on this server; the admin routes take the admin key.
    assert len(greedy(Client(server.url))) == 12
    assert admin.continue_generation()["success"] is True


def test_non_loopback_server_refuses_admin_routes(server_factory, default_model_dir):
    s = server_factory([*TINY_ARGS, "--host", "0.0.0.0"]).wait_ready()
    r = httpx.post(s.url + "/update_weight_version", json={"new_version": "x"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    assert httpx.post(s.url + "/flush_cache", timeout=30).status_code == 403
    assert len(greedy(Client(s.url))) == 12
    s.stop()


def test_profile_needs_a_directory(tiny_server):
    c = Client(tiny_server.url)
    with pytest.raises(ServerError) as e:
        c.start_profile()
    assert status(e) == 400 and "--profile-dir" in str(e.value)


def test_profile_writes_a_trace(admin, profile_dir):
    assert admin.start_profile()["success"]
    with pytest.raises(ServerError) as e:
        admin.start_profile()
    assert status(e) == 400
    greedy(admin, 4)
    path = Path(admin.stop_profile()["path"])
    assert path.parent == profile_dir and path.is_file()
    assert "traceEvents" in json.loads(path.read_text())
    with pytest.raises(ServerError):
        admin.stop_profile()


# ---- weight version ----
def test_weight_version_reported(server, admin):
    assert admin.get_model_info()["weight_version"] == "default"
    res = admin.update_weight_version("v1")
    assert res["success"] and res["new_version"] == "v1"
    assert admin.get_model_info()["weight_version"] == "v1"
    assert admin.get_server_info()["weight_version"] == "v1"
    out = admin.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 2})
    assert out["meta_info"]["weight_version"] == "v1"
    comp = admin.completions(prompt=PROMPT, max_tokens=2)
    assert comp["weight_version"] == "v1"
    with pytest.raises(ServerError) as e:
        admin.update_weight_version("")
    assert status(e) == 400
    assert admin.get_model_info()["weight_version"] == "v1"


# ---- weights ----
def test_get_weights_by_name(server, admin):
    rows = admin.get_weights_by_name(PARAM, truncate_size=3)
    assert len(rows) == 3 and len(rows[0]) == 128
    r = httpx.get(server.url + "/get_weights_by_name", params={"name": PARAM, "truncate_size": 2},
                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200 and r.json() == rows[:2]
    with pytest.raises(ServerError) as e:
        admin.get_weights_by_name("model.no_such.weight")
    assert status(e) == 400 and "no_such" in str(e.value)


def test_update_from_disk(server, admin, tiny_model_dir, tmp_path):
    before = greedy(admin)
    version = admin.get_model_info()["weight_version"]
    for bad in (str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(ServerError) as e:
            admin.update_weights_from_disk(bad, weight_version="never")
        assert status(e) == 400
        assert e.value.body["success"] is False
    assert greedy(admin) == before                          # the old weights still serve
    assert admin.get_model_info()["weight_version"] == version
    ckpt = tiny_model_dir("tiny-llama")
    res = admin.update_weights_from_disk(str(ckpt), weight_version="disk-1")
    assert res["success"] and res["num_paused_requests"] == 0
    assert admin.get_model_info()["weight_version"] == "disk-1"
    expected, _ = hf_greedy(ckpt, PROMPT, 12)
    assert greedy(admin) == expected != before


def test_update_from_tensor(admin):
    shape = torch.tensor(admin.get_weights_by_name(PARAM, truncate_size=1 << 20)).shape
    new = torch.randn(shape)
    res = admin.update_weights_from_tensor([(PARAM, new)], weight_version="tensor-1")
    assert res["success"] and admin.get_model_info()["weight_version"] == "tensor-1"
    assert torch.equal(torch.tensor(admin.get_weights_by_name(PARAM, truncate_size=1 << 20)), new)
    # Flattened bucket with mixed dtypes (bf16 is cast to the model's fp32), in two calls.
    up = "model.layers.1.mlp.up_proj.weight"
    pairs = [(PARAM, torch.randn(shape)), (up, torch.randn(128, 64).to(torch.bfloat16))]
    admin.update_weights_from_tensor(pairs, load_format="flattened_bucket", bucket_bytes=1)
    for name, t in pairs:
        assert torch.equal(torch.tensor(admin.get_weights_by_name(name, truncate_size=1 << 20)), t.float())
    # A wrong shape changes nothing.
    with pytest.raises(ServerError) as e:
        admin.update_weights_from_tensor([(PARAM, torch.zeros(3, 3))], weight_version="bad")
    assert status(e) == 400
    assert admin.get_model_info()["weight_version"] == "tensor-1"
    assert torch.equal(torch.tensor(admin.get_weights_by_name(PARAM, truncate_size=1 << 20)), pairs[0][1])


def test_update_from_distributed_group(admin):
    from rlserve.weight_sync.group import WeightSender

    sender = WeightSender("127.0.0.1", free_port(), world_size=2, backend="gloo")
    assert admin.connect_weight_sender(sender)["success"]
    try:
        shape = torch.tensor(admin.get_weights_by_name(PARAM, truncate_size=1 << 20)).shape
        pairs = [(PARAM, torch.randn(shape)), ("model.norm.weight", torch.randn(64).to(torch.bfloat16))]
        res = admin.update_weights_from_distributed(sender, pairs, weight_version="dist-1", bucket_bytes=4096)
        assert res["success"] and admin.get_model_info()["weight_version"] == "dist-1"
        for name, t in pairs:
            assert torch.equal(torch.tensor(admin.get_weights_by_name(name, truncate_size=1 << 20)), t.float())
        pairs = [(PARAM, torch.randn(shape))]
        admin.update_weights_from_distributed(sender, pairs, load_format=None)
        assert torch.equal(torch.tensor(admin.get_weights_by_name(PARAM, truncate_size=1 << 20)), pairs[0][1])
        # An announcement that does not match the model fails before anything is copied.
        with pytest.raises(ServerError) as e:
            admin.update_weights_from_distributed(sender, [("model.nope", torch.zeros(2))], load_format=None)
        assert status(e) == 400
        assert torch.equal(torch.tensor(admin.get_weights_by_name(PARAM, truncate_size=1 << 20)), pairs[0][1])
    finally:
        assert admin.destroy_weights_update_group()["success"]
        sender.close()
    with pytest.raises(ServerError) as e:
        admin.destroy_weights_update_group()
    assert status(e) == 400


# ---- memory ----
def test_release_and_resume_memory(server, admin):
    before = greedy(admin)
    with pytest.raises(ServerError) as e:
        admin.release_memory_occupation(["gpu_stuff"])
    assert status(e) == 400
    res = admin.release_memory_occupation(["kv_cache", "cuda_graph"])
    assert res["released"] == ["kv_cache"]
    assert server.info()["released"] == ["kv_cache"]
    with pytest.raises(ServerError) as e:
        greedy(admin)
    assert status(e) == 503
    assert admin.release_memory_occupation()["released"] == ["kv_cache", "weights"]
    assert admin.resume_memory_occupation()["released"] == []
    assert greedy(admin) == before                         # resumed weights are the old ones


# ---- pause ----
def stream(url: str, rid: str, max_new_tokens: int, out: dict, started: threading.Event | None = None) -> None:
    body = {"input_ids": PROMPT, "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    last = None
    with httpx.stream("POST", url + "/generate", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                if started is not None:
                    started.set()
    out[rid] = last


def test_pause_modes_validated(admin):
    r = httpx.post(admin.base_url + "/pause_generation", json={"mode": "sideways"},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code in (400, 422)


def test_pause_abort_ends_streams(server, admin):
    admin.pause_generation("in_place")            # the requests below wait: none can finish first
    out: dict = {}
    threads = [threading.Thread(target=stream, args=(server.url, f"ab-{i}", 200, out)) for i in range(4)]
    for t in threads:
        t.start()
    server.wait_for_requests(4)
    assert admin.pause_generation("abort")["num_paused_requests"] == 4
    for t in threads:
        t.join(120)
    assert sorted(out) == [f"ab-{i}" for i in range(4)]
    assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in out.values())
    admin.continue_generation()
    assert len(greedy(admin, 4)) == 4
    server.wait_until(lambda i: i["num_requests"] == 0 and i["kv_leaked"] == 0, "nothing left")


def test_pause_in_place_and_retract_keep_greedy_tokens(server, admin):
    expected = greedy(admin, 300)
    for mode in ("in_place", "retract"):
        out: dict = {}
        started = threading.Event()
        t = threading.Thread(target=stream, args=(server.url, f"keep-{mode}", 300, out, started))
        t.start()
        assert started.wait(120)
        res = admin.pause_generation(mode)
        info = server.info()
        assert info["paused"] is True
        if res["num_paused_requests"]:            # it was still running when the pause came
            assert info["num_running"] == (1 if mode == "in_place" else 0)
        # A new request waits while paused, and finishes after continue.
        late: dict = {}
        t2 = threading.Thread(target=stream, args=(server.url, f"late-{mode}", 3, late))
        t2.start()
        server.wait_for_requests(2 if res["num_paused_requests"] else 1)
        assert not late
        admin.continue_generation()
        t.join(120)
        t2.join(120)
        assert out[f"keep-{mode}"]["output_ids"] == expected
        assert out[f"keep-{mode}"]["meta_info"]["finish_reason"]["type"] == "length"
        assert len(late[f"late-{mode}"]["output_ids"]) == 3
    server.wait_until(lambda i: i["num_requests"] == 0 and i["kv_leaked"] == 0, "nothing left")
