"""Serving benchmark: streams requests at a running OpenAI-compatible server (rlserve or any other) and
measures what a client sees.

Only /v1/completions is required. Prompt ids are drawn below the server's vocabulary size from rlserve's
/get_model_info; a server without that route needs --vocab-size or --tokenizer. --flush-cache is skipped
with a note where /flush_cache is absent; the model id sent defaults to the first /v1/models lists.

Datasets (prompts are random token ids, sent as a token-id `prompt` to /v1/completions):
  random         --num-prompts requests of --input-len prompt tokens.
  shared-prefix  --num-groups groups × --questions-per-group questions; a group's requests share a
                 random --prefix-len prefix, each adds its own random --question-len suffix.
--input-len and --output-len are N (fixed) or LO:HI (uniform in [LO, HI], seeded by --seed). Every
request asks for exactly its output length (max_tokens with ignore_eos).

Arrival: --request-rate R sends with Poisson gaps (exponential, mean 1/R s; inf sends all at once);
--max-concurrency C keeps at most C requests in flight. Both may be combined. --client-processes N sends
from N processes on the same schedule, C split between them (rlserve.bench.client_processes), for loads
that keep one client process busy.

Measured per request (streaming, stream_options.include_usage):
  TTFT  send → the first chunk that carries choices.
  ITL   the gap between successive choice-carrying chunks. A chunk carrying k tokens (k from the
        chunk's usage when the server reports usage on every chunk, else 1) adds k samples of gap/k,
        so ITL is per token. rlserve sends one chunk per engine step, one token each, unless a stream
        has fallen behind; then its chunk holds the steps it missed, and reports usage on every chunk.
  E2E   send → the end of the stream.
  TPOT  (E2E − TTFT) / (output tokens − 1), requests with more than one output token.
Token counts come from the final usage chunk (the server's own count); cached tokens from
usage.prompt_tokens_details. Throughputs are over the run's wall time: first send to last finish.
A request that fails (HTTP error, in-band error event, disconnect, timeout) is counted and reported,
never retried; its figures are left out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, replace
from typing import Any

from rlserve.bench.client_processes import run_in_processes
from rlserve.bench.server_info import flush_cache, server_info, server_state
from rlserve.bench.serving_client import DEFAULT_BASE_URL, RunConfig, make_client, run_requests
from rlserve.bench.serving_stats import Summary, report, summarize
from rlserve.bench.serving_workload import BenchRequest, parse_len, random_requests, shared_prefix_requests

WARMUP_INPUT_LEN = 32
WARMUP_OUTPUT_LEN = 16


def build_requests(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    if args.dataset == "random":
        reqs = random_requests(args.num_prompts, args.input_len, args.output_len, vocab_size, args.seed)
    else:
        reqs = shared_prefix_requests(args.num_groups, args.questions_per_group, args.prefix_len,
                                      args.question_len, args.output_len, vocab_size, args.seed)
    if args.shuffle:
        random.Random(args.seed + 1).shuffle(reqs)
    return reqs


def check_fits(requests: list[BenchRequest], max_model_len: int) -> None:
    longest = max(len(r.prompt) + r.output_len for r in requests)
    if longest > max_model_len:
        raise ValueError(f"a request needs {longest} tokens (prompt + output) but the server's "
                         f"max_model_len is {max_model_len}")


async def bench(args: argparse.Namespace) -> tuple[Summary, dict[str, Any]]:
    """Warm up, optionally flush, run; the summary and the JSON record of the run."""
    cfg = RunConfig(base_url=args.base_url.rstrip("/"), api_key=args.api_key, model=args.model,
                    request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                    temperature=args.temperature, timeout_s=args.timeout, seed=args.seed,
                    progress=not args.no_tqdm)
    async with make_client(cfg) as client:
        info = await server_info(client, args.vocab_size, args.tokenizer)
        cfg = replace(cfg, model=cfg.model or info.model)
        vocab = min(info.vocab_size, args.max_token_id + 1) if args.max_token_id else info.vocab_size
        requests = build_requests(args, vocab)
        if info.max_model_len:
            check_fits(requests, info.max_model_len)
        if args.warmup:
            # Their own random prompts, so that warming up can't seed the prefix cache with the run's prompts.
            warm = random_requests(args.warmup, (WARMUP_INPUT_LEN,) * 2, (WARMUP_OUTPUT_LEN,) * 2, vocab,
                                   args.seed + 2)
            warm_cfg = replace(cfg, request_rate=math.inf, progress=False)
            results = (await run_requests(client, warm, warm_cfg)).results
            if not all(r.ok for r in results):
                print(f"warning: {sum(not r.ok for r in results)} warm-up request(s) failed: "
                      f"{next(r.error for r in results if not r.ok)}", file=sys.stderr)
        flushed = await flush_cache(client) if args.flush_cache else None
        if args.client_processes > 1:
            run = await asyncio.to_thread(run_in_processes, requests, cfg, args.client_processes)
        else:
            run = await run_requests(client, requests, cfg)
        after = await server_state(client)
    summary = summarize(requests, *run)
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": run_config(args),
              "server": {**info.record, **after, "cache_flushed": flushed}, "num_requests": len(requests), **asdict(summary)}
    return summary, json_safe(record)


_NOT_CONFIG = {"command", "bench_command", "func", "api_key", "json_out", "no_tqdm"}
_DATASET_ONLY = {"random": {"num_prompts", "input_len"},
                 "shared-prefix": {"num_groups", "questions_per_group", "prefix_len", "question_len"}}


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that shaped the run (the other dataset's flags and the API key left out)."""
    other = set().union(*(v for k, v in _DATASET_ONLY.items() if k != args.dataset))
    config = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG | other}
    config["request_rate"] = str(args.request_rate) if math.isinf(args.request_rate) else args.request_rate
    return config


def json_safe(x: Any) -> Any:
    """nan (no samples) → null, so that the line stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def title(args: argparse.Namespace) -> str:
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}/s"
    conc = args.max_concurrency or "unlimited"
    label = f" [{args.label}]" if args.label else ""
    return f"rlserve bench serving{label}: {args.dataset}, rate {rate}, max concurrency {conc}"


# ---- CLI ----
def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("server")
    s.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"default {DEFAULT_BASE_URL}")
    s.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer <key>'")
    s.add_argument("--model", default=None, help="model id to send (default: none, the server's own)")
    s.add_argument("--flush-cache", action="store_true",
                   help="flush the server's prefix cache before the run (skipped with a note if it has no such route)")
    s.add_argument("--vocab-size", type=int, default=None,
                   help="draw prompt ids below this (default: the server's /get_model_info, which only rlserve has)")
    s.add_argument("--tokenizer", default=None,
                   help="draw prompt ids from this tokenizer's vocabulary (a name or directory; instead of --vocab-size)")
    d = parser.add_argument_group("dataset")
    d.add_argument("--dataset", choices=("random", "shared-prefix"), default="random")
    d.add_argument("--num-prompts", type=int, default=256, help="random: number of requests (default 256)")
    d.add_argument("--input-len", type=parse_len, default=(1024, 1024), metavar="N|LO:HI",
                   help="random: prompt tokens (default 1024)")
    d.add_argument("--output-len", type=parse_len, default=(256, 256), metavar="N|LO:HI",
                   help="output tokens of every request (default 256)")
    d.add_argument("--num-groups", type=int, default=32, help="shared-prefix: prefixes (default 32)")
    d.add_argument("--questions-per-group", type=int, default=16, help="shared-prefix: default 16")
    d.add_argument("--prefix-len", type=int, default=2048, help="shared-prefix: default 2048")
    d.add_argument("--question-len", type=int, default=64, help="shared-prefix: default 64")
    d.add_argument("--shuffle", action="store_true", help="send in a seeded random order (default: dataset order)")
    d.add_argument("--max-token-id", type=int, default=None,
                   help="draw prompt ids in [0, this] (default: the whole vocabulary)")
    b = parser.add_argument_group("load")
    b.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals, requests/s (default inf: all at once)")
    b.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    b.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    b.add_argument("--warmup", type=int, default=0, metavar="N",
                   help=f"first send N short requests ({WARMUP_INPUT_LEN} in / {WARMUP_OUTPUT_LEN} out), not counted")
    b.add_argument("--client-processes", type=int, default=1,
                   help="send from this many processes (default 1); one process parsing every stream gets busy "
                        "at tens of thousands of tokens a second")
    b.add_argument("--timeout", type=float, default=3600.0, help="per-request read timeout in s (default 3600)")
    b.add_argument("--seed", type=int, default=0, help="seeds the dataset and the arrival times")
    b.add_argument("--json-out", metavar="FILE", help="append the result as one JSON line")
    b.add_argument("--label", default=None, help="a free-form tag stored in the JSON line, e.g. radix-off")
    b.add_argument("--no-tqdm", action="store_true", help="no progress bar")


def validate(args: argparse.Namespace) -> None:
    positive = {"--num-prompts": args.num_prompts, "--num-groups": args.num_groups,
                "--questions-per-group": args.questions_per_group, "--prefix-len": args.prefix_len,
                "--question-len": args.question_len,
                "--timeout": args.timeout}
    if args.max_concurrency is not None:
        positive["--max-concurrency"] = args.max_concurrency
    positive["--client-processes"] = args.client_processes
    if args.max_token_id is not None:
        positive["--max-token-id"] = args.max_token_id
    if args.vocab_size is not None:
        positive["--vocab-size"] = args.vocab_size
    for flag, value in positive.items():
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.max_concurrency is not None and args.max_concurrency < args.client_processes:
        raise ValueError(f"--max-concurrency {args.max_concurrency} is less than --client-processes "
                         f"{args.client_processes}: every process needs a share of it")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be positive (inf for all at once), got {args.request_rate}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")


def main(args: argparse.Namespace) -> int:
    validate(args)
    try:
        import httpx
    except ImportError:
        raise ValueError("rlserve bench serving needs httpx: pip install httpx") from None
    try:
        summary, record = asyncio.run(bench(args))
    except httpx.HTTPError as e:
        raise ValueError(f"the server at {args.base_url} failed: {type(e).__name__}: {e}") from None
    print(report(summary, title(args)))
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
    return 0 if summary.completed else 1
