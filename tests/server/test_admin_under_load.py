"""Admin routes under load on a real server (tiny checkpoint, CPU, fp32): each pause mode with 64 open
streams, and an update from tensors checked against the test process's own copy of the perturbed model."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
import torch

from rlserve.client import Client
from tests.server.conftest import assert_served_matches_local

ADMIN = "admin-secret"
N_STREAMS = 64
MAX_TOKENS = 24
HANG_S = 300          # only to end a hang; nothing asserts on time
SP = {"max_new_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir):
    return tiny_model_dir("tiny-llama")


@pytest.fixture(scope="module")
def server(server_factory, ckpt):
    args = ["--model", str(ckpt), "--max-total-tokens", "16384", "--max-model-len", "512",
            "--admin-api-key", ADMIN]
    return server_factory(args).wait_ready()


@pytest.fixture(scope="module")
def admin(server):
    with Client(server.url, admin_api_key=ADMIN, timeout=HANG_S) as c:
        yield c


def prompts(seed: int, n: int = N_STREAMS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(100, 5000) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


def reference(admin: Client, ps: list[list[int]]) -> list[list[int]]:
    """An uninterrupted greedy pass of the same prompts on the same server."""
    outs = admin.generate(input_ids=ps, sampling_params=SP)
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    return [o["output_ids"] for o in outs]


async def load_then_pause(server, ps: list[list[int]], mode: str, check_paused=None):
    """Open one stream per prompt; once some stream has a few chunks, pause with `mode`; call
    `check_paused(info)` while paused, then continue (after the streams end, for abort). Returns the
    last object of every stream and the pause answer."""
    chunks = [0] * len(ps)
    last: list[dict | None] = [None] * len(ps)
    going = asyncio.Event()
    auth = {"Authorization": f"Bearer {ADMIN}"}

    async with httpx.AsyncClient(base_url=server.url, timeout=HANG_S,
                                 limits=httpx.Limits(max_connections=N_STREAMS + 8)) as http:
        async def one(i: int) -> None:
            body = {"input_ids": ps[i], "rid": f"{mode}-{i}", "stream": True, "sampling_params": SP}
            async with http.stream("POST", "/generate", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        last[i] = json.loads(line[6:])
                        chunks[i] += 1
                        if chunks[i] >= 3:
                            going.set()

        tasks = [asyncio.create_task(one(i)) for i in range(len(ps))]
        await asyncio.wait_for(going.wait(), HANG_S)
        # Streams not seen finished just before the pause (an upper bound on those it can catch).
        open_at_pause = sum(1 for o in last if not finished(o))
        r = await http.post("/pause_generation", json={"mode": mode}, headers=auth)
        assert r.status_code == 200, r.text
        paused = r.json()
        assert paused["success"] is True
        info = (await http.get("/get_server_info", headers=auth)).json()
        assert info["paused"] is True
        if check_paused:
            check_paused(info, paused)
        if mode == "abort":
            await asyncio.wait_for(asyncio.gather(*tasks), HANG_S)
            after = (await http.get("/get_server_info", headers=auth)).json()
            (await http.post("/continue_generation", headers=auth)).raise_for_status()
        else:
            # Nothing finishes while paused: the streams still open stay open.
            assert sum(1 for t in tasks if not t.done()) >= 1 or paused["num_paused_requests"] == 0
            (await http.post("/continue_generation", headers=auth)).raise_for_status()
            await asyncio.wait_for(asyncio.gather(*tasks), HANG_S)
            after = None
    return last, paused, open_at_pause, after


def finished(o: dict | None) -> bool:
    return o is not None and bool((o["meta_info"].get("finish_reason") or {}).get("type"))


def idle(info: dict) -> bool:
    return (info["num_running"] == 0 and info["num_waiting"] == 0 and info["num_requests"] == 0
            and info["kv_leaked"] == 0)


def test_pause_abort_under_load(server, admin):
    ps = prompts(1)
    expected = reference(admin, ps)
    last, paused, open_at_pause, after = asyncio.run(load_then_pause(server, ps, "abort"))
    assert all(o is not None for o in last)
    reasons = [o["meta_info"]["finish_reason"]["type"] for o in last]
    assert set(reasons) <= {"abort", "length"}
    # Every request the pause caught ends its stream with "abort"; the others had already finished whole.
    assert paused["num_paused_requests"] > 0
    assert reasons.count("abort") == paused["num_paused_requests"]
    assert reasons.count("abort") <= open_at_pause
    for o, want in zip(last, expected):
        if o["meta_info"]["finish_reason"]["type"] == "length":
            assert o["output_ids"] == want
        else:                                   # what it had so far is a prefix of the greedy run
            assert o["output_ids"] == want[:len(o["output_ids"])] and len(o["output_ids"]) < MAX_TOKENS
    # All KV back to free: nothing running or waiting, no leak.
    server.wait_until(idle, "nothing left after abort")
    info = server.info()
    assert info["kv_leaked"] == 0 and info["kv_available"] + info["tree_tokens"] == info["kv_total"]
    assert after is not None and after["num_running"] == 0 and after["num_waiting"] == 0
    assert info["paused"] is False
    assert reference(admin, ps[:4]) == expected[:4]        # the server still serves after continue


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_keeps_greedy_tokens_under_load(server, admin, mode):
    ps = prompts(2 if mode == "retract" else 3)
    expected = reference(admin, ps)

    def check(info: dict, paused: dict) -> None:
        if mode == "retract":
            assert info["num_running"] == 0        # retracted requests wait with their KV freed
        elif paused["num_paused_requests"]:
            assert info["num_running"] >= 1        # held in place with their KV

    last, paused, _, _ = asyncio.run(load_then_pause(server, ps, mode, check))
    assert paused["num_paused_requests"] > 0
    for i, (o, want) in enumerate(zip(last, expected)):
        assert o is not None, i
        assert o["meta_info"]["finish_reason"]["type"] == "length", (i, o["meta_info"])
        assert o["output_ids"] == want, i
    server.wait_until(idle, f"nothing left after {mode}")
    info = server.info()
    assert info["kv_available"] + info["tree_tokens"] == info["kv_total"]


# ---- update from tensor vs. the test process's own forward ----
@torch.no_grad()
def test_update_from_tensor_matches_local_forward(server, admin, ckpt):
    from rlserve import LLM, SamplingParams

    llm = LLM(str(ckpt), device="cpu", dtype="float32", max_total_tokens=4096, max_model_len=512)
    torch.manual_seed(7)
    pairs = [(name, p.detach().clone() + 0.02 * torch.randn_like(p))
             for name, p in llm.engine.model.named_parameters()]
    ps = prompts(4, 8)
    n = 12
    before = reference(admin, ps)

    res = admin.update_weights_from_tensor(pairs, weight_version="perturbed")
    assert res["success"] and admin.get_model_info()["weight_version"] == "perturbed"
    llm.engine.update_weights(pairs)

    name, t = pairs[0]
    rows = min(4, t.shape[0])
    assert torch.equal(torch.tensor(admin.get_weights_by_name(name, truncate_size=rows)), t[:rows].float())

    sp = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
    served = admin.generate(input_ids=ps, sampling_params=sp, return_logprob=True, top_logprobs_num=2)
    local = llm.generate(ps,
                         SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2), use_tqdm=False)
    assert_served_matches_local(served, local)
    changed = sum(s["output_ids"] != old for s, old in zip(served, before))
    assert changed > 0                        # the perturbation really changed what the server serves

    # And a plain forward of the perturbed model (prompt + greedy tokens): the same logprobs.
    hf = _hf_perturbed(ckpt, pairs)
    for s, p in zip(served, ps):
        seq = torch.tensor([p + s["output_ids"]])
        logits = hf(seq).logits[0].float()
        lps = torch.log_softmax(logits, -1)
        for j, (lp, tok, _) in enumerate(s["meta_info"]["output_token_logprobs"]):
            pos = len(p) - 1 + j
            assert int(lps[pos].argmax()) == tok
            assert abs(float(lps[pos, tok]) - lp) <= 1e-4


def _hf_perturbed(ckpt, pairs):
    """transformers' model of the checkpoint with the same perturbed parameters (by HF name)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    params = dict(m.named_parameters(remove_duplicate=False))
    for name, t in pairs:
        params[name].data.copy_(t)
    return m
