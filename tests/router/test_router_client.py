"""RouterClient against two tiny workers behind a real router: a weight update from tensors reaches every
worker; one that fails its update leaves the router (requests keep succeeding on the other) and comes back
with the next update that succeeds on it; the router's metrics and the workers' own, joined per worker."""
from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch
from conftest import HEALTH_INTERVAL_S, TINY_FLAGS

from rlserve.router.client import FanOutError, RouterClient
from rlserve.router.config import RouterConfig
from rlserve.router.dp import DataParallel
from rlserve.router.metrics import router_per_worker, summary

PROMPTS = [[11, 12, 13, 14], [200, 300, 400]]
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir):
    return tiny_model_dir("tiny-llama")


@pytest.fixture(scope="module")
def pair(ckpt, tmp_path_factory) -> Any:
    """Two workers of the tiny checkpoint behind a round-robin router."""
    flags = [*TINY_FLAGS[2:], "--model", str(ckpt), "--dtype", "float32"]
    cfg = RouterConfig(policy="round_robin", health_check_interval_secs=HEALTH_INTERVAL_S)
    d = DataParallel(flags, 2, router=cfg, log_dir=tmp_path_factory.mktemp("pair-logs"), drain_timeout=5)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def rc(pair):
    with RouterClient(pair.router_url) as c:
        yield c


@pytest.fixture(scope="module")
def local(ckpt):
    from rlserve import LLM

    return LLM(str(ckpt), device="cpu", dtype="float32", max_total_tokens=4096, max_model_len=512)


def perturbed(local, seed: int) -> list[tuple[str, torch.Tensor]]:
    """New weights for the local engine (applied to it) and the same tensors to push."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    with torch.no_grad():
        for name, p in local.engine.model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            pairs.append((name, p.detach().clone()))
    local.engine.flush_cache()
    return pairs


def direct_greedy(rc: RouterClient, url: str) -> list[list[int]]:
    return [o["output_ids"] for o in rc.worker(url).generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def local_greedy(local) -> list[list[int]]:
    from rlserve import SamplingParams

    outs = local.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def versions(pair) -> list[str]:
    return [httpx.get(u + "/get_server_info", timeout=30).json()["weight_version"] for u in pair.worker_urls]


def test_update_from_tensor_reaches_every_worker(pair, rc, local):
    before = direct_greedy(rc, pair.worker_urls[0])
    rc.pause_generation("in_place")
    try:
        result = rc.update_weights_from_tensor(perturbed(local, 1), weight_version="v1")
    finally:
        rc.continue_generation()
    assert result.failed == {} and sorted(result.ok) == sorted(pair.worker_urls)
    assert versions(pair) == ["v1", "v1"]
    want = local_greedy(local)
    assert want != before                          # the update changed what the model says
    for url in pair.worker_urls:
        assert direct_greedy(rc, url) == want
    # the admin fan-out reads the same tensor from both
    name = next(n for n, _ in local.engine.model.named_parameters())
    values = list(rc.get_weights_by_name(name, truncate_size=2).values())
    assert len(values) == 2 and values[0] == values[1]


def test_failed_update_takes_the_worker_out_until_one_succeeds(pair, rc, local):
    good, bad = pair.worker_urls
    pairs = perturbed(local, 2)

    def update(c):
        if c.base_url == bad:
            return c.update_weights_from_disk("/nonexistent/weights", weight_version="v2")
        return c.update_weights_from_tensor(pairs, weight_version="v2")
    result = rc.update_weights(update)
    assert result.ok == [good] and list(result.failed) == [bad]
    assert rc.worker_urls() == [good] and bad in rc.held_out
    assert versions(pair) == ["v2", "v1"]             # the bad one kept its weights and its version
    served_before = int(httpx.get(bad + "/get_server_info", timeout=30).json()["stats"]["prompt_tokens"])
    for i in range(6):                                # round robin would give the bad one half of them
        out = rc.generate(input_ids=[7, 8, 9 + i], sampling_params=GREEDY, return_logprob=True)
        assert out["meta_info"]["weight_version"] == "v2"
    assert int(httpx.get(bad + "/get_server_info", timeout=30).json()["stats"]["prompt_tokens"]) == served_before
    # an admin fan-out reaches only the workers in rotation
    assert list(rc.flush_cache()) == [good]

    # the next update succeeds everywhere: the held-out worker is back, serving what the other serves
    result = rc.update_weights_from_tensor(perturbed(local, 3), weight_version="v3")
    assert result.failed == {} and rc.held_out == {}
    assert sorted(rc.worker_urls()) == sorted(pair.worker_urls)
    assert versions(pair) == ["v3", "v3"]
    assert direct_greedy(rc, good) == direct_greedy(rc, bad) == local_greedy(local)


def test_update_failing_everywhere_keeps_every_worker(pair, rc):
    with pytest.raises(FanOutError) as e:
        rc.update_weights_from_disk("/nonexistent/weights", weight_version="never")
    assert sorted(e.value.result.failed) == sorted(pair.worker_urls)
    assert sorted(rc.worker_urls()) == sorted(pair.worker_urls) and rc.held_out == {}
    assert versions(pair) == ["v3", "v3"]


def test_metrics_per_worker(pair, rc):
    """The router's per-worker request counts (smg_worker_cb_outcomes_total) and the workers' own
    prefix-cache counters, scraped from the URLs `rlserve serve --dp` prints."""
    before = router_per_worker(pair.metrics_url)
    shared = list(range(100, 164))                   # a 64-token prefix, then a distinct tail
    for i in range(8):
        assert rc.generate(input_ids=[*shared, 1000 + i], sampling_params={"max_new_tokens": 2})["output_ids"]
    after = summary(pair.metrics_url, pair.worker_urls)
    for url in pair.worker_urls:
        row = after[url]
        assert row["healthy"] == 1
        # round robin: 4 of the 8 each
        assert row["routed_ok"] - before.get(url, {}).get("routed_ok", 0.0) == 4
        assert row["requests"] >= 4 and row["prompt_tokens"] > 0
        # from the second request on a worker, the shared prefix comes from its cache
        assert row["cached_tokens"] >= 3 * 64 and 0 < row["cache_hit_rate"] <= 1
