from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from rlserve.bench import serving
from rlserve.bench.client_processes import concurrency_shares, run_in_processes, shards
from rlserve.bench.serving import build_requests, validate
from rlserve.bench.serving_client import RequestResult, RunConfig, StreamTimer, make_client, run_requests, send_request
from rlserve.bench.serving_stats import Stats, percentile, summarize
from rlserve.bench.serving_workload import (
    BenchRequest,
    arrival_times,
    parse_len,
    random_requests,
    shared_prefix_requests,
)
from rlserve.cli import main


# ---- datasets ----
def test_parse_len():
    assert parse_len("256") == (256, 256)
    assert parse_len("100:1024") == (100, 1024)
    for bad in ("0", "9:3", "x", "1:y"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_len(bad)


def test_random_requests_lengths_and_ids():
    reqs = random_requests(200, (10, 40), (5, 9), vocab_size=50, seed=3)
    assert len(reqs) == 200
    ins = [len(r.prompt) for r in reqs]
    outs = [r.output_len for r in reqs]
    assert min(ins) >= 10 and max(ins) <= 40 and len(set(ins)) > 20     # spread over the range
    assert set(outs) == {5, 6, 7, 8, 9}
    assert all(0 <= t < 50 for r in reqs for t in r.prompt)
    assert len({t for r in reqs for t in r.prompt}) == 50
    fixed = random_requests(5, (7, 7), (3, 3), vocab_size=1000, seed=0)
    assert [len(r.prompt) for r in fixed] == [7] * 5 and [r.output_len for r in fixed] == [3] * 5


def test_datasets_are_determined_by_the_seed():
    assert random_requests(20, (5, 50), (1, 9), 1000, seed=1) == random_requests(20, (5, 50), (1, 9), 1000, seed=1)
    assert random_requests(20, (5, 50), (1, 9), 1000, seed=1) != random_requests(20, (5, 50), (1, 9), 1000, seed=2)
    a = shared_prefix_requests(3, 4, 30, 5, (8, 8), 1000, seed=7)
    assert a == shared_prefix_requests(3, 4, 30, 5, (8, 8), 1000, seed=7)
    assert a != shared_prefix_requests(3, 4, 30, 5, (8, 8), 1000, seed=8)


def test_shared_prefix_structure():
    g, q, p, s = 4, 5, 64, 6
    reqs = shared_prefix_requests(g, q, p, s, (16, 16), vocab_size=30000, seed=0)
    assert len(reqs) == g * q
    assert [r.group for r in reqs] == [i for i in range(g) for _ in range(q)]
    assert all(len(r.prompt) == p + s and r.output_len == 16 for r in reqs)
    prefixes = [tuple(r.prompt[:p]) for r in reqs]
    for i in range(g):
        group = reqs[i * q:(i + 1) * q]
        assert len({tuple(r.prompt[:p]) for r in group}) == 1            # one prefix per group
        assert len({tuple(r.prompt[p:]) for r in group}) == q            # distinct questions
    assert len(set(prefixes)) == g                                       # distinct prefixes across groups


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serving.add_arguments(parser)
    return parser.parse_args(flags)


def test_shuffle_keeps_the_requests_and_changes_the_order():
    plain = build_requests(_args("--dataset", "shared-prefix", "--num-groups", "4", "--questions-per-group", "4",
                                 "--prefix-len", "8", "--question-len", "2"), vocab_size=1000)
    mixed = build_requests(_args("--dataset", "shared-prefix", "--num-groups", "4", "--questions-per-group", "4",
                                 "--prefix-len", "8", "--question-len", "2", "--shuffle"), vocab_size=1000)
    assert mixed != plain
    assert sorted(mixed, key=lambda r: r.prompt) == sorted(plain, key=lambda r: r.prompt)


# ---- arrivals ----
def test_poisson_gaps_have_mean_one_over_rate():
    rate, n = 40.0, 20000
    t = arrival_times(n, rate, seed=0)
    gaps = np.diff(t)
    assert t[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)            # exponential: std equals mean
    assert arrival_times(100, rate, seed=5) == arrival_times(100, rate, seed=5)
    assert arrival_times(100, rate, seed=5) != arrival_times(100, rate, seed=6)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(7, math.inf, seed=0) == [0.0] * 7


# ---- statistics ----
def test_percentile_on_known_inputs():
    xs = list(range(1, 101))
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 100
    assert percentile([4.0], 99) == 4.0
    assert math.isnan(percentile([], 50))
    data = [random.Random(1).expovariate(1.0) for _ in range(777)]
    for q in (1, 25, 50, 90, 99):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_stats_are_in_milliseconds():
    s = Stats.of([0.001, 0.002, 0.003, 0.010])
    assert s.count == 4
    assert s.mean_ms == pytest.approx(4.0)
    assert s.median_ms == pytest.approx(2.5)
    assert s.p99_ms == pytest.approx(3 + 7 * 0.97)
    assert math.isnan(Stats.of([]).mean_ms)


def test_stream_timer_splits_a_multi_token_chunk_into_per_token_gaps():
    t = StreamTimer(start=10.0)
    t.on_chunk({"choices": [{"text": "a"}], "usage": None}, 10.5)
    t.on_chunk({"choices": [{"text": "b"}], "usage": None}, 10.6)
    t.on_chunk({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}, 10.7)
    res = t.finish(10.8, prompt_len=9)
    assert res.ok and res.ttft == pytest.approx(0.5) and res.e2e == pytest.approx(0.8)
    assert res.itl == pytest.approx([0.1]) and res.output_tokens == 2 and res.chunks == 2

    # A server reporting usage on every chunk: the second chunk carries 3 tokens → 3 samples of gap/3.
    t = StreamTimer(start=0.0)
    t.on_chunk({"choices": [{"text": "a"}], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}, 1.0)
    t.on_chunk({"choices": [{"text": "bcd"}], "usage": {"prompt_tokens": 4, "completion_tokens": 4}}, 1.3)
    res = t.finish(1.4, prompt_len=4)
    assert res.itl == pytest.approx([0.1, 0.1, 0.1]) and res.output_tokens == 4

    # A first chunk of 2 tokens: the second came with it, a gap of 0.
    t = StreamTimer(start=0.0)
    t.on_chunk({"choices": [{"text": "ab"}], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}, 1.0)
    t.on_chunk({"choices": [{"text": "c"}], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}, 1.5)
    res = t.finish(1.6, prompt_len=4)
    assert res.ttft == pytest.approx(1.0) and res.itl == pytest.approx([0.0, 0.5]) and res.output_tokens == 3


def test_stream_timer_rejects_error_events_and_empty_streams():
    t = StreamTimer(start=0.0)
    with pytest.raises(RuntimeError, match="boom"):
        t.on_chunk({"error": {"message": "boom"}}, 1.0)
    with pytest.raises(RuntimeError, match="without a token"):
        StreamTimer(start=0.0).finish(1.0, prompt_len=3)


def test_summary_counts_only_completed_requests():
    reqs = [BenchRequest([1, 2, 3], 4), BenchRequest([1, 2], 5), BenchRequest([7], 2)]
    results = [RequestResult(ok=True, prompt_tokens=3, output_tokens=4, cached_tokens=1, ttft=0.1, e2e=0.4,
                             itl=[0.1, 0.1, 0.1], chunks=4),
               RequestResult(error="HTTP 503: busy"),
               RequestResult(ok=True, prompt_tokens=1, output_tokens=2, ttft=0.2, e2e=0.3, itl=[0.1], chunks=2)]
    s = summarize(reqs, results, duration_s=2.0, client_cpu_s=0.5)
    assert (s.completed, s.failed, s.errors) == (2, 1, ["HTTP 503: busy"])
    assert (s.total_input_tokens, s.total_output_tokens, s.requested_output_tokens, s.cached_tokens) == (4, 6, 6, 1)
    assert s.request_throughput == 1.0 and s.output_throughput == 3.0 and s.input_throughput == 2.0
    assert s.ttft.mean_ms == pytest.approx(150) and s.e2e.median_ms == pytest.approx(350)
    assert s.itl.count == 4 and s.tpot.mean_ms == pytest.approx((100 + 100) / 2)
    assert s.client_cpu_util == 0.25


def test_bad_flags_are_usage_errors(capsys):
    assert main(["bench", "serving", "--max-concurrency", "0"]) == 2
    assert "--max-concurrency must be positive" in capsys.readouterr().err
    assert main(["bench", "serving", "--request-rate", "0"]) == 2


def test_an_unreachable_server_fails_requests_without_raising():
    async def go():
        async with make_client(RunConfig(base_url="http://127.0.0.1:9", timeout_s=5)) as client:
            return await send_request(client, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2})
    res = asyncio.run(go())
    assert not res.ok and "ConnectError" in res.error


# ---- end to end against a real tiny server ----
def _server_module():
    path = Path(__file__).parents[1] / "server" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_server_conftest_for_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_server(tmp_path_factory, default_model_dir):
    srv = _server_module()
    server = srv.Server(list(srv.TINY_ARGS), tmp_path_factory.mktemp("bench-server-logs")).wait_ready()
    yield server
    server.stop()


def test_every_request_completes_with_consistent_timings(bench_server):
    reqs = random_requests(12, (16, 48), (4, 12), vocab_size=49152, seed=0) + [BenchRequest([5] * 600, 4)]
    cfg = RunConfig(base_url=bench_server.url, max_concurrency=4, request_rate=200.0)

    async def go():
        async with make_client(cfg) as client:
            return await run_requests(client, reqs, cfg)
    results, duration, cpu = asyncio.run(go())
    assert 0 < cpu
    good, bad = results[:-1], results[-1]
    assert not bad.ok and "HTTP 400" in bad.error and "maximum context length" in bad.error
    for req, res in zip(reqs, good):
        assert res.ok, res.error
        assert res.output_tokens == req.output_len and res.prompt_tokens == len(req.prompt)
        assert 0 < res.ttft <= res.e2e <= duration
        # A chunk holds one token, or several where the server's stream fell behind and merged them;
        # the continuous usage counts spread each chunk's gap over its tokens, one ITL sample a token.
        assert 1 <= res.chunks <= res.output_tokens
        assert len(res.itl) == res.output_tokens - 1
        assert res.ttft + sum(res.itl) <= res.e2e + 1e-6


def test_cli_random_and_shared_prefix_runs(bench_server, tmp_path, capsys):
    out = tmp_path / "serving.jsonl"
    common = ["--base-url", bench_server.url, "--max-concurrency", "4", "--no-tqdm", "--json-out", str(out)]
    random_flags = ["--dataset", "random", "--num-prompts", "12", "--input-len", "16:48", "--output-len", "4:12",
                    "--warmup", "2", "--flush-cache", "--seed", "3"]
    shared_flags = ["--dataset", "shared-prefix", "--num-groups", "2", "--questions-per-group", "3",
                    "--prefix-len", "64", "--question-len", "8", "--output-len", "6", "--request-rate", "100"]
    assert main(["bench", "serving", *random_flags, *common]) == 0
    printed = capsys.readouterr().out
    for label in ("completed requests", "failed requests", "request/s", "input tok/s", "output tok/s",
                  "TTFT", "ITL", "E2E"):
        assert label in printed
    assert main(["bench", "serving", *shared_flags, *common]) == 0

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2
    for rec, flags in zip(lines, (random_flags, shared_flags)):
        expected = build_requests(_args(*flags), vocab_size=rec["server"]["vocab_size"])
        assert rec["num_requests"] == rec["completed"] == len(expected) and rec["failed"] == 0
        assert rec["total_output_tokens"] == rec["requested_output_tokens"] == sum(r.output_len for r in expected)
        assert rec["total_input_tokens"] == sum(len(r.prompt) for r in expected)
        assert rec["ttft"]["mean_ms"] <= rec["e2e"]["mean_ms"] and rec["ttft"]["p99_ms"] <= rec["e2e"]["p99_ms"]
        assert rec["itl"]["count"] == rec["total_output_tokens"] - rec["completed"]
        assert rec["ttft"]["count"] == rec["e2e"]["count"] == rec["completed"]
        assert 0 < rec["client_cpu_util"] and rec["duration_s"] > 0 and rec["output_throughput"] == pytest.approx(
            rec["total_output_tokens"] / rec["duration_s"])
    assert lines[0]["config"]["dataset"] == "random" and lines[0]["config"]["flush_cache"] is True
    assert lines[1]["config"]["request_rate"] == 100.0
    assert "num_groups" not in lines[0]["config"] and "num_prompts" not in lines[1]["config"]
    assert all(rec["server"]["kv_leaked"] == 0 for rec in lines)     # the bench's requests freed their KV
    # Later questions of a group find the group's prefix in the radix cache.
    assert lines[1]["cached_tokens"] >= 64


def test_requests_split_over_client_processes():
    assert shards(7, 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert shards(2, 3) == [[0], [1], []]
    assert concurrency_shares(64, 3) == [22, 21, 21] and concurrency_shares(None, 2) == [None, None]
    with pytest.raises(ValueError, match="can't be split"):
        concurrency_shares(2, 3)
    with pytest.raises(ValueError, match="less than --client-processes"):
        validate(_args("--max-concurrency", "2", "--client-processes", "3"))
    with pytest.raises(ValueError, match="--client-processes must be positive"):
        validate(_args("--client-processes", "0"))


def test_several_client_processes_send_every_request_in_order(bench_server):
    reqs = random_requests(10, (16, 48), (3, 12), vocab_size=49152, seed=4)
    cfg = RunConfig(base_url=bench_server.url, max_concurrency=4, request_rate=100.0, seed=4)
    results, duration, cpu = run_in_processes(reqs, cfg, 3)
    assert len(results) == len(reqs) and cpu > 0
    for req, res in zip(reqs, results):     # each result sits at its request's place
        assert res.ok, res.error
        assert res.output_tokens == req.output_len and res.prompt_tokens == len(req.prompt)
        assert 0 < res.ttft <= res.e2e <= duration
        assert len(res.itl) == res.output_tokens - 1


def test_cli_with_client_processes(bench_server, tmp_path):
    out = tmp_path / "serving.jsonl"
    flags = ["--base-url", bench_server.url, "--num-prompts", "8", "--input-len", "16:40", "--output-len", "3:9",
             "--max-concurrency", "4", "--client-processes", "2", "--no-tqdm", "--json-out", str(out), "--seed", "5"]
    assert main(["bench", "serving", *flags]) == 0
    rec = json.loads(out.read_text())
    expected = build_requests(_args(*flags), vocab_size=rec["server"]["vocab_size"])
    assert rec["completed"] == len(expected) == 8 and rec["failed"] == 0
    assert rec["total_output_tokens"] == sum(r.output_len for r in expected)
    assert rec["itl"]["count"] == rec["total_output_tokens"] - rec["completed"]
    assert rec["config"]["client_processes"] == 2
