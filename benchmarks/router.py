"""Data parallelism behind sglang-router: routing policies compared, and the router's own added latency.

    python benchmarks/router.py policies [--workers 4] [--devices 0,0,0,0] [--groups 32 ...] [server flags...]
    python benchmarks/router.py overhead [--step-ms 20] [--requests 200]

`policies`: starts --workers rlserve servers (one process each, as `rlserve serve --dp` does; several on
one CUDA device split --gpu-memory-fraction) and, for each of --policies in turn, a fresh router in
front of them. Before each policy every worker's prefix cache is flushed and its counters read; the
shared-prefix workload (--groups prefixes of --prefix-len tokens × --questions questions of
--question-len, shuffled, --output-len tokens each) is sent through the router under --max-concurrency;
then the counters are read again. Reported per policy: output tok/s, req/s, TTFT p50/p99 (the client's
view, as `rlserve bench serving` measures it) and the prefix-cache hit rate summed over the workers'
own counters (cached / prompt tokens, after − before), with the requests each worker took.

The router routes /v1/completions by the prompt's text (cache_aware keeps a prefix tree of characters
per worker) and refuses token-id prompts there, so the prompts are text: each token id of the dataset
is a vocabulary entry that is one word with a leading space, which the tokenizer encodes back to that
one id, so --prefix-len counts tokens. The tokenizer is --tokenizer, else the model's own; presets
without one (qwen3-0.6b) need --tokenizer (any directory: ids stay below the model's vocabulary when
the tokenizer's is smaller, e.g. SmolLM2's 49,152 under qwen3's 151,936). Unknown arguments go to every
worker, --tokenizer too.

`overhead`: benchmarks/router_standin.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):     # run as `python benchmarks/router.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from rlserve.bench.client_processes import run_in_processes
from rlserve.bench.serving import json_safe
from rlserve.bench.serving_client import RunConfig, make_client, run_requests
from rlserve.bench.serving_stats import Summary, report, summarize
from rlserve.bench.serving_workload import BenchRequest, random_requests, shared_prefix_requests
from rlserve.net import free_port
from rlserve.router.config import POLICIES, RouterConfig
from rlserve.router.dp import Worker, WorkerSpec, memory_fractions, start_rounds
from rlserve.router.launch import RouterProcess
from rlserve.router.metrics import worker_stats

FLUSH_TRIES = 40


# ---- the workload: the shared-prefix dataset as text ----
def word_tokens(tokenizer_dir: str) -> list[str]:
    """Vocabulary entries that decode to ' ' + ASCII letters and encode back to themselves alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = []
    for i in range(len(tok)):
        s = tok.decode([i])
        if len(s) >= 4 and s[0] == " " and s[1:].isascii() and s[1:].isalpha() \
                and tok.encode(s, add_special_tokens=False) == [i]:
            words.append(s)
    if len(words) < 1000:
        raise ValueError(f"{tokenizer_dir}: only {len(words)} one-word tokens; need a larger vocabulary")
    return words


def text_requests(args: argparse.Namespace, words: list[str]) -> list[BenchRequest]:
    """rlserve bench serving's shared-prefix dataset (same seed, same shuffle), each id a word."""
    reqs = shared_prefix_requests(args.groups, args.questions, args.prefix_len, args.question_len,
                                  (args.output_len,) * 2, len(words), args.seed)
    random.Random(args.seed + 1).shuffle(reqs)
    # BenchRequest.prompt goes to /v1/completions as it is: a string is a text prompt.
    return [replace(r, prompt="".join(words[i] for i in r.prompt)) for r in reqs]  # type: ignore[arg-type]


def tokenizer_dir(args: argparse.Namespace) -> str:
    if args.tokenizer:
        return args.tokenizer
    from rlserve.models.loader import resolve_model

    found = resolve_model(args.model, args.load_format or "auto").tokenizer_dir
    if found is None:
        raise ValueError(f"model {args.model!r} has no tokenizer: pass --tokenizer DIR (it goes to the workers too)")
    return str(found)


# ---- the workers, and one router per policy ----
def start_workers(args: argparse.Namespace, server_flags: list[str], log_dir: Path) -> list[Worker]:
    devices = args.devices.split(",") if args.devices else None
    if devices is not None and len(devices) != args.workers:
        raise ValueError(f"--devices lists {len(devices)} device(s) for --workers {args.workers}")
    fractions = memory_fractions(devices, args.gpu_memory_fraction) if devices else [None] * args.workers
    specs = [WorkerSpec(i, free_port(), devices[i] if devices else None, fractions[i]) for i in range(args.workers)]
    workers = [Worker(s, server_flags, log_dir) for s in specs]
    if args.threads_per_worker:      # several CPU workers on few cores: spinning OpenMP threads starve each other
        for w in workers:
            w.process.env = {**(w.process.env or {}), "OMP_NUM_THREADS": str(args.threads_per_worker)}
    try:
        for batch in start_rounds(specs):     # workers sharing a device start one after the other
            for s in batch:
                workers[s.index].process.start()
            for s in batch:
                workers[s.index].wait_ready()
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def stop_workers(workers: list[Worker]) -> None:
    for w in workers:
        w.process.terminate()
    for w in workers:
        w.process.wait(60)


def flush(url: str) -> None:
    """The worker's /flush_cache refuses while requests still hold the cache: retry briefly."""
    for _ in range(FLUSH_TRIES):
        if httpx.post(url + "/flush_cache", timeout=30).status_code == 200:
            return
        time.sleep(0.25)
    raise RuntimeError(f"{url} would not flush its prefix cache")


def warm_up(urls: list[str], n: int, vocab: int, seed: int) -> None:
    """n short requests straight to each worker (not through a router: its tree stays empty)."""
    async def go() -> None:
        reqs = random_requests(n, (32, 32), (8, 8), vocab, seed + 7)
        for u in urls:
            async with make_client(RunConfig(base_url=u)) as c:
                run = await run_requests(c, reqs, RunConfig(base_url=u))
                if not all(r.ok for r in run.results):
                    raise RuntimeError(f"warm-up on {u} failed: {next(r.error for r in run.results if not r.ok)}")
    if n:
        asyncio.run(go())


def served_model(url: str) -> str:
    """The model id to send: the router's /v1/completions requires `model`."""
    r = httpx.get(url + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def cache_counters(urls: list[str]) -> dict[str, dict[str, float]]:
    return {u: worker_stats(u) for u in urls}


def policy_config(policy: str, args: argparse.Namespace) -> RouterConfig:
    """A --policies entry: a policy name, or `cache_aware:ABS` for that policy with its own
    balance_abs_threshold (several thresholds compared against the same workers)."""
    name, _, abs_threshold = policy.partition(":")
    if name not in POLICIES or (abs_threshold and (name != "cache_aware" or not abs_threshold.isdigit())):
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)} "
                         "(or cache_aware:N, N its balance_abs_threshold)")
    return RouterConfig(policy=name, log_level="warn",
                        balance_abs_threshold=int(abs_threshold) if abs_threshold else args.balance_abs_threshold,
                        balance_rel_threshold=args.balance_rel_threshold)


def run_policy(policy: str, args: argparse.Namespace, urls: list[str], requests: list[BenchRequest],
               log_dir: Path) -> dict[str, Any]:
    cfg = policy_config(policy, args)
    log = log_dir / f"router-{policy.replace(':', '-')}.log"
    router = RouterProcess(cfg, urls, "127.0.0.1", free_port(), log).start()
    try:
        router.wait_workers(urls)
        for u in urls:
            flush(u)
        before = cache_counters(urls)
        started = time.time()          # wall clock: to line the run up with a device monitor's samples
        run_cfg = RunConfig(base_url=router.url, model=served_model(urls[0]), max_concurrency=args.max_concurrency,
                            seed=args.seed, progress=not args.no_tqdm)
        if args.client_processes > 1:
            run = run_in_processes(requests, run_cfg, args.client_processes)
        else:
            async def go() -> Any:
                async with make_client(run_cfg) as c:
                    return await run_requests(c, requests, run_cfg)
            run = asyncio.run(go())
        ended = time.time()
        after = cache_counters(urls)
    finally:
        router.stop()
    summary = summarize(requests, *run)
    delta = {u: {k: after[u][k] - before[u][k] for k in ("requests", "prompt_tokens", "cached_tokens")}
             for u in urls}
    prompt = sum(d["prompt_tokens"] for d in delta.values())
    cached = sum(d["cached_tokens"] for d in delta.values())
    return {"policy": policy, "summary": summary, "hit_rate": cached / prompt if prompt else 0.0,
            "prompt_tokens": prompt, "cached_tokens": cached,
            "requests_per_worker": [int(delta[u]["requests"]) for u in urls], "started": started, "ended": ended}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'policy':<17}{'out tok/s':>11}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'hit rate':>10}  requests/worker"
    lines = [head, "-" * len(head)]
    for r in rows:
        s: Summary = r["summary"]
        lines.append(f"{r['policy']:<17}{s.output_throughput:>11,.1f}{s.request_throughput:>8.2f}"
                     f"{s.ttft.median_ms:>10.0f}{s.ttft.p99_ms:>10.0f}{r['hit_rate']:>10.1%}  "
                     + "/".join(map(str, r["requests_per_worker"])))
    return "\n".join(lines) + "\n(TTFT in ms; hit rate: cached / prompt tokens over every worker's own counters)"


def policies_main(args: argparse.Namespace, server_flags: list[str]) -> int:
    for p in args.policies:
        policy_config(p, args)            # a bad entry fails before any worker starts
    if args.model:
        server_flags = ["--model", args.model, *server_flags]
    if args.load_format:
        server_flags = ["--load-format", args.load_format, *server_flags]
    if args.tokenizer:
        server_flags = ["--tokenizer", args.tokenizer, *server_flags]
    words = word_tokens(tokenizer_dir(args))
    requests = text_requests(args, words)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="router-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(requests)} requests ({args.groups} groups × {args.questions}, prefix {args.prefix_len} + "
          f"question {args.question_len} tokens, {args.output_len} out), {args.workers} workers; logs in {log_dir}",
          flush=True)
    workers = start_workers(args, ["--log-level", "warning", *server_flags], log_dir)
    urls = [w.url for w in workers]
    try:
        warm_up(urls, args.warmup, len(words), args.seed)
        rows = []
        for p in args.policies:
            rows.append(run_policy(p, args, urls, requests, log_dir))
            print(report(rows[-1]["summary"], f"{p}, {args.workers} workers"), flush=True)
            print(f"{p}: {time.strftime('%H:%M:%S', time.gmtime(rows[-1]['started']))}–"
                  f"{time.strftime('%H:%M:%S', time.gmtime(rows[-1]['ended']))} UTC", flush=True)
    finally:
        stop_workers(workers)
    print(table(rows))
    rr = next((r for r in rows if r["policy"] == "round_robin"), None)
    for ca in (r for r in rows if r["policy"].startswith("cache_aware") and rr is not None):
        tp = ca["summary"].output_throughput / (rr["summary"].output_throughput or float("nan"))
        hit = ca["hit_rate"] / rr["hit_rate"] if rr["hit_rate"] else float("inf")
        print(f"{ca['policy']} / round_robin: output throughput {tp:.2f}× (GPU target ≥ 1.5×), "
              f"hit rate {hit:.2f}× (GPU target ≥ 3×)")
    if args.json_out:
        line = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bench": "router policies",
                "config": {k: v for k, v in vars(args).items() if k not in ("func", "json_out")},
                "server_flags": server_flags, "runs": [{**r, "summary": asdict(r["summary"])} for r in rows]}
        with open(args.json_out, "a") as f:
            f.write(json.dumps(json_safe(line), allow_nan=False) + "\n")
    return 0 if all(r["summary"].failed == 0 for r in rows) else 1


def add_policies_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="as rlserve serve's (default: the default SmolLM2-135M)")
    p.add_argument("--load-format", default=None, help="e.g. dummy for a preset's shape with random weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (for the prompts and the workers)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--devices", default=None, metavar="LIST", help="CUDA device of each worker, e.g. 0,0,0,0")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.85,
                   help="of a device, split between the workers on it (default 0.85)")
    p.add_argument("--threads-per-worker", type=int, default=None,
                   help="OMP_NUM_THREADS of each worker (CPU workers sharing few cores; default: torch's)")
    p.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"],
                   help="each in turn; cache_aware:N is cache_aware with balance_abs_threshold N")
    p.add_argument("--balance-abs-threshold", type=int, default=None,
                   help="cache_aware: load gap (requests) before it routes by load (router default 64)")
    p.add_argument("--balance-rel-threshold", type=float, default=None,
                   help="cache_aware: load ratio before it routes by load (router default 1.5)")
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--questions", type=int, default=4, help="questions per group")
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--client-processes", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2, help="short requests straight to each worker first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json-out", default=None, help="append one JSON line with every policy's figures")
    p.add_argument("--no-tqdm", action="store_true")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    add_policies_args(sub.add_parser("policies", help="cache_aware against round_robin on N rlserve workers"))
    from benchmarks import router_standin

    router_standin.add_args(sub.add_parser("overhead", help="the router's added latency over a stand-in worker"))
    args, extra = ap.parse_known_args(argv)
    if args.command == "overhead":
        if extra:
            ap.error(f"unknown arguments: {' '.join(extra)}")
        return router_standin.main(args)
    return policies_main(args, extra)


if __name__ == "__main__":
    sys.exit(main())
