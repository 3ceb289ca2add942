"""Weight updates on a real server (tiny checkpoint, CPU, fp32).

Good updates from disk and through a gloo group serve exactly the weights the trainer holds: the values read
back, and greedy tokens and logprobs equal to the test process's own engine updated with the same tensors.
Bad updates (from disk, tensors and a group, and a trainer that dies mid-broadcast) answer 400 and leave the
previous weights and weight version serving. A request paused across an update reports which weight version
sampled which of its tokens (weight_version_spans)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from admin_update_workers import SPECS, dying_trainer, update_pairs
from safetensors.torch import load_file, save_file

from rlserve.client import Client, ServerError
from rlserve.net import free_port
from rlserve.weight_sync.group import WeightSender
from tests.server.conftest import assert_served_matches_local

ADMIN = "admin-secret"
HANG_S = 300          # only to end a hang; nothing asserts on time
N = 12
SP = {"max_new_tokens": N, "temperature": 0, "ignore_eos": True}
PROMPTS = [[1, 422, 3459, 314, 4915, 28, 5230], [1, 900, 800, 700, 600], [1, 17, 300, 42, 4000, 11, 12, 13]]
PARAM = "model.layers.0.mlp.down_proj.weight"
ALL_ROWS = 1 << 20
CTX = mp.get_context("spawn")


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir) -> Path:
    return tiny_model_dir("tiny-llama")


@pytest.fixture(scope="module")
def server(server_factory, ckpt):
    args = ["--model", str(ckpt), "--max-total-tokens", "16384", "--max-model-len", "512", "--admin-api-key", ADMIN]
    return server_factory(args).wait_ready()


@pytest.fixture(scope="module")
def admin(server):
    with Client(server.url, admin_api_key=ADMIN, timeout=HANG_S) as c:
        yield c


@pytest.fixture(scope="module")
def local(ckpt):
    """The test process's own engine: every update that reaches the server is applied here too."""
    from rlserve import LLM

    return LLM(str(ckpt), device="cpu", dtype="float32", max_total_tokens=4096, max_model_len=512)


def perturbed(local, seed: int, scale: float = 0.02) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(name, p.detach().clone() + scale * torch.randn(p.shape, generator=g))
            for name, p in local.engine.model.named_parameters()]


def greedy(admin: Client) -> list[list[int]]:
    return [o["output_ids"] for o in admin.generate(input_ids=PROMPTS, sampling_params=SP)]


def served_values(admin: Client, name: str, rows: int = ALL_ROWS) -> torch.Tensor:
    return torch.tensor(admin.get_weights_by_name(name, truncate_size=rows))


def assert_values(admin: Client, pairs: list[tuple[str, torch.Tensor]]) -> None:
    """The server's parameters are the trainer's tensors (cast to the model's fp32); a big one by its first rows."""
    for name, t in pairs:
        rows = min(t.shape[0], 64)
        assert torch.equal(served_values(admin, name, rows), t[:rows].float()), name


@torch.no_grad()
def assert_matches_local(admin: Client, local) -> list[list[int]]:
    """Greedy tokens and their logprobs (top 2 too) from the server equal the local engine's."""
    from rlserve import SamplingParams

    served = admin.generate(input_ids=PROMPTS, sampling_params=SP, return_logprob=True, top_logprobs_num=2)
    mine = local.generate(PROMPTS, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=2),
                          use_tqdm=False)
    assert_served_matches_local(served, mine)
    return [s["output_ids"] for s in served]


def assert_refused(call, admin: Client, version: str, before: list[list[int]], param: torch.Tensor) -> ServerError:
    """`call` answers 400 (SGLang's {success: false}) and the server serves as before."""
    with pytest.raises(ServerError) as e:
        call()
    assert e.value.status == 400, e.value.body
    assert e.value.body["success"] is False
    assert admin.get_model_info()["weight_version"] == version
    assert torch.equal(served_values(admin, PARAM), param)
    assert greedy(admin) == before
    return e.value


# ---- good updates: the served weights are the trainer's ----
def test_update_from_disk_matches_local_forward(admin, local, ckpt, tmp_path):
    before = greedy(admin)
    tensors = load_file(str(ckpt / "model.safetensors"))
    g = torch.Generator().manual_seed(11)
    tensors = {n: t + 0.02 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
               for n, t in tensors.items()}
    out = tmp_path / "perturbed"
    out.mkdir()
    for f in ckpt.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"))

    res = admin.update_weights_from_disk(str(out), weight_version="disk-perturbed")
    assert res["success"] and res["weight_version"] == "disk-perturbed"
    pairs = [(n, t) for n, t in tensors.items() if not local.engine.model.ignores_checkpoint_tensor(n)]
    local.engine.update_weights(pairs)
    assert admin.get_model_info()["weight_version"] == "disk-perturbed"
    assert_values(admin, pairs)
    assert assert_matches_local(admin, local) != before     # the perturbation changed what is served


def test_update_from_distributed_matches_local_forward(admin, local):
    before = greedy(admin)
    # Mixed dtypes in flattened buckets: every other tensor goes as bf16 (both sides cast it to fp32).
    pairs = [(n, t.to(torch.bfloat16) if i % 2 else t) for i, (n, t) in enumerate(perturbed(local, 12))]
    sender = WeightSender("127.0.0.1", free_port(), world_size=2, backend="gloo")
    assert admin.connect_weight_sender(sender)["success"]
    try:
        res = admin.update_weights_from_distributed(sender, pairs, weight_version="dist-perturbed",
                                                    bucket_bytes=256 << 10)
        assert res["success"] and res["weight_version"] == "dist-perturbed"
    finally:
        assert admin.destroy_weights_update_group()["success"]
        sender.close()
    local.engine.update_weights(pairs)
    assert_values(admin, pairs)
    assert assert_matches_local(admin, local) != before


# ---- bad updates: 400, and the previous weights and version keep serving ----
def test_bad_updates_from_disk(admin, ckpt, tmp_path):
    version, before, param = admin.get_model_info()["weight_version"], greedy(admin), served_values(admin, PARAM)
    tensors = load_file(str(ckpt / "model.safetensors"))

    def checkpoint(name: str, weights: dict[str, torch.Tensor] | None = None, raw: bytes | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in ckpt.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy(f, d / f.name)
        if weights is not None:
            save_file(weights, str(d / "model.safetensors"))
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw)
        return d

    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "missing": tmp_path / "missing",
        "no config": empty,
        "no weights": checkpoint("no-weights"),
        "corrupt": checkpoint("corrupt", raw=b"not a safetensors file" * 8),
        "a tensor missing": checkpoint("lacking", {n: t for n, t in tensors.items() if n != PARAM}),
        "wrong shape": checkpoint("shape", {**tensors, PARAM: torch.zeros(3, 3)}),
        "integer dtype": checkpoint("int", {**tensors, PARAM: torch.zeros(tensors[PARAM].shape, dtype=torch.int32)}),
        "unknown tensor": checkpoint("unknown", {**tensors, "model.nope.weight": torch.zeros(2)}),
    }
    for what, path in cases.items():
        err = assert_refused(lambda: admin.update_weights_from_disk(str(path), weight_version="never"),
                             admin, version, before, param)
        assert "internal error" not in err.body["message"], what


def test_bad_updates_from_tensor(admin):
    version, before, param = admin.get_model_info()["weight_version"], greedy(admin), served_values(admin, PARAM)
    bad = {
        "unknown name": [("model.nope.weight", torch.zeros(4))],
        "wrong shape": [(PARAM, torch.zeros(3, 3))],
        "integer dtype": [(PARAM, torch.zeros(param.shape, dtype=torch.int64))],
        # All or nothing: a good tensor before a bad one is not copied either.
        "good then bad": [(PARAM, torch.randn(param.shape)), ("model.norm.weight", torch.zeros(65))],
    }
    for load_format in (None, "flattened_bucket"):
        for pairs in bad.values():
            assert_refused(lambda: admin.update_weights_from_tensor(pairs, load_format=load_format,
                                                                    weight_version="never", bucket_bytes=None),
                           admin, version, before, param)
    for garbage in ("%%% not base64", "AAAA"):       # a payload no serializer made
        err = assert_refused(lambda: admin.update_weights_from_serialized(garbage, weight_version="never"),
                             admin, version, before, param)
        assert "internal error" not in err.body["message"]


def test_bad_updates_from_distributed(admin, local):
    version, before, param = admin.get_model_info()["weight_version"], greedy(admin), served_values(admin, PARAM)
    sender = WeightSender("127.0.0.1", free_port(), world_size=2, backend="gloo")
    assert admin.connect_weight_sender(sender)["success"]
    try:
        bad = [[("model.nope.weight", torch.zeros(4))],
               [(PARAM, torch.zeros(3, 3))],
               [(PARAM, torch.zeros(param.shape, dtype=torch.int32))],
               [(PARAM, torch.randn(param.shape)), ("model.norm.weight", torch.zeros(65))]]
        for load_format in (None, "flattened_bucket"):
            for pairs in bad:
                # The server receives the whole broadcast (the group stays in step) and then refuses it.
                assert_refused(lambda: admin.update_weights_from_distributed(
                    sender, pairs, load_format=load_format, weight_version="never"), admin, version, before, param)
        # The group still works.
        pairs = [(PARAM, param + 0.01 * torch.randn(param.shape))]
        admin.update_weights_from_distributed(sender, pairs, load_format=None, weight_version="dist-after-bad")
        local.engine.update_weights(pairs)
        assert torch.equal(served_values(admin, PARAM), pairs[0][1])
        assert admin.get_model_info()["weight_version"] == "dist-after-bad"
    finally:
        assert admin.destroy_weights_update_group()["success"]
        sender.close()


def test_a_trainer_dying_mid_broadcast_changes_nothing(admin, local):
    version, before, param = admin.get_model_info()["weight_version"], greedy(admin), served_values(admin, PARAM)
    port, go = free_port(), CTX.Event()
    trainer = CTX.Process(target=dying_trainer, args=(port, 5, go))
    trainer.start()
    try:
        assert admin.init_weights_update_group("127.0.0.1", port, 1, 2, backend="gloo")["success"]
        announcement = WeightSender("127.0.0.1", port).describe(update_pairs(5), bucket_bytes=1)
        assert len(announcement["names"]) == len(SPECS) > 1      # one bucket each; it sends only the first

        def announce() -> None:
            admin.announce_distributed_update(weight_version="never", **announcement)
        go.set()
        err = assert_refused(announce, admin, version, before, param)
        assert "failed" in err.body["message"]
    finally:
        go.set()
        trainer.join(HANG_S)
    assert trainer.exitcode == 3
    # A restarted trainer joins again under the same group name (the failed group is replaced) and updates.
    sender = WeightSender("127.0.0.1", free_port(), world_size=2, backend="gloo")
    assert admin.connect_weight_sender(sender)["success"]
    try:
        pairs = update_pairs(6)
        res = admin.update_weights_from_distributed(sender, pairs, weight_version="after-dead-trainer",
                                                    bucket_bytes=1)
        assert res["success"]
        local.engine.update_weights(pairs)
        assert_values(admin, pairs)
        assert_matches_local(admin, local)
    finally:
        assert admin.destroy_weights_update_group()["success"]
        sender.close()


# ---- weight_version_spans: which version sampled which tokens ----
def test_a_request_paused_across_an_update_reports_both_versions(server, admin, local):
    old = admin.get_model_info()["weight_version"]
    assert old != "v2"
    max_new = 480                                   # long enough to be running when the pause comes
    chunks: list[tuple[dict, bool]] = []            # (cumulative item, received before /continue_generation)
    continued = threading.Event()
    started = threading.Event()

    def stream() -> None:
        body = {"input_ids": PROMPTS[0], "stream": True,
                "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=HANG_S) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append((json.loads(line[6:]), not continued.is_set()))
                    if len(chunks) >= 3:
                        started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(HANG_S)
    seen_before_pause = len(chunks[-1][0]["output_ids"])
    assert admin.pause_generation("in_place")["num_paused_requests"] == 1
    pairs = [(PARAM, served_values(admin, PARAM) + 0.01)]
    assert admin.update_weights_from_tensor(pairs, weight_version="v2")["weight_version"] == "v2"
    local.engine.update_weights(pairs)
    continued.set()
    admin.continue_generation()
    t.join(HANG_S)

    final = chunks[-1][0]
    assert len(final["output_ids"]) == max_new and final["meta_info"]["weight_version"] == "v2"
    spans = final["meta_info"]["weight_version_spans"]
    assert len(spans) == 2 and spans[0] == [0, old] and spans[1][1] == "v2"
    k = spans[1][0]
    # The boundary is the number of tokens streamed before the pause: every chunk up to it reports the old
    # version alone, every later one both; nothing past it arrived before continue.
    assert seen_before_pause <= k < max_new
    for item, before_continue in chunks:
        n = len(item["output_ids"])
        assert item["meta_info"]["weight_version_spans"] == ([[0, old]] if n <= k else spans)
        assert n <= k or not before_continue
    assert k in [len(item["output_ids"]) for item, _ in chunks]

    # Requests that run under one version have one span, on every route.
    out = admin.generate(input_ids=PROMPTS[1], sampling_params=SP)
    assert out["meta_info"]["weight_version_spans"] == [[0, "v2"]]
    comp = admin.completions(prompt=PROMPTS[1], max_tokens=4, n=2)
    assert comp["weight_version"] == "v2"
    assert [c["weight_version_spans"] for c in comp["choices"]] == [[[0, "v2"]]] * 2
    chat = admin.chat(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat["choices"][0]["weight_version_spans"] == [[0, "v2"]]


def _server_processes(root: int) -> list[int]:
    """The server's pid and its descendants (the engine process)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        found += frontier
    return found


def _mapped_shared_files(pids: list[int], marker: str) -> int:
    count = 0
    for pid in pids:
        try:
            count += sum(marker in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
        except OSError:
            pass
    return count


def test_tensor_updates_are_unmapped_after_the_answer(server, admin, local):
    """The engine drops what it mapped for an update after answering (in the background): the trainer's
    shared-memory files are mapped in no server process shortly after, update after update."""
    pairs = perturbed(local, seed=23, scale=0.01)
    for round_ in range(2):
        pairs = [(n, t + 0.001) for n, t in pairs]
        assert admin.update_weights_from_tensor(pairs, weight_version=f"unmap-{round_}", bucket_bytes=None)["success"]
        local.engine.update_weights(pairs)
        assert_values(admin, pairs)
        marker = f"torch_{os.getpid()}_"           # torch's shared-memory files carry the producer's pid
        deadline = time.monotonic() + 30
        while _mapped_shared_files(_server_processes(server.pid), marker):
            assert time.monotonic() < deadline, "the server still maps the trainer's tensors 30 s after the update"
            time.sleep(0.05)
    assert_matches_local(admin, local)
