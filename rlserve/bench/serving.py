"""Serving benchmark: streams requests at a running rlserve server and measures what a client sees.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"     # `rlserve serve`'s default --port
WARMUP_INPUT_LEN = 32
WARMUP_OUTPUT_LEN = 16
CLIENT_BUSY_WARN = 0.8
FLUSH_RETRIES = 20                              # the flush route refuses while requests still hold the cache


# ---- datasets ----
@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    output_len: int
    group: int = -1            # shared-prefix group, -1 for random requests


def parse_len(text: str) -> tuple[int, int]:
    """'256' → (256, 256); '100:1024' → (100, 1024)."""
    lo, _, hi = text.partition(":")
    try:
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length or LO:HI range: {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text!r}")
    return bounds


def _ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(n)]


def random_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    vocab_size: int, seed: int) -> list[BenchRequest]:
    """`num` requests; each draws its input length, its ids, then its output length."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        ids = _ids(rng, rng.randint(*input_len), vocab_size)
        out.append(BenchRequest(ids, rng.randint(*output_len)))
    return out


def shared_prefix_requests(num_groups: int, questions_per_group: int, prefix_len: int, question_len: int,
                           output_len: tuple[int, int], vocab_size: int, seed: int) -> list[BenchRequest]:
    """Group by group: a random prefix, then its questions (prefix + a random suffix, then an output length)."""
    rng = random.Random(seed)
    out = []
    for g in range(num_groups):
        prefix = _ids(rng, prefix_len, vocab_size)
        for _ in range(questions_per_group):
            question = _ids(rng, question_len, vocab_size)
            out.append(BenchRequest(prefix + question, rng.randint(*output_len), g))
    return out


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send offsets (s from the start) of a Poisson process of `rate` requests/s; all 0 for inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ---- statistics ----
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Mean, median and p99 of a list of durations, in milliseconds."""
    mean_ms: float
    median_ms: float
    p99_ms: float
    count: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = [s * 1000 for s in seconds]
        mean = sum(ms) / len(ms) if ms else math.nan
        return cls(mean, percentile(ms, 50), percentile(ms, 99), len(ms))


# ---- one request ----
@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0            # choice-carrying chunks


def completion_payload(req: BenchRequest, model: str | None, temperature: float) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "prompt": req.prompt, "max_tokens": req.output_len, "ignore_eos": True,
        "temperature": temperature, "stream": True,
        # continuous usage gives each chunk's token count on servers that report it; rlserve ignores it
        # and sends one token a chunk.
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if model:
        payload["model"] = model
    return payload


class StreamTimer:
    """Turns a completion stream's parsed chunks, with their arrival times, into a RequestResult."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.last_chunk: float | None = None
        self.tokens_seen = 0
        self.usage: dict[str, Any] | None = None
        self.res = RequestResult()

    def on_chunk(self, data: dict[str, Any], now: float) -> None:
        if "error" in data:
            err = data["error"]
            raise RuntimeError(f"error event: {err.get('message', err) if isinstance(err, dict) else err}")
        usage = data.get("usage")
        if usage:
            self.usage = usage
        if not data.get("choices"):
            return
        k = 1
        if usage and usage.get("completion_tokens") is not None:
            k = max(usage["completion_tokens"] - self.tokens_seen, 1)
        self.tokens_seen += k
        self.res.chunks += 1
        if self.last_chunk is None:
            self.res.ttft = now - self.start
            self.res.itl += [0.0] * (k - 1)      # tokens that came with the first one came without a gap
        else:
            self.res.itl += [(now - self.last_chunk) / k] * k
        self.last_chunk = now

    def finish(self, now: float, prompt_len: int) -> RequestResult:
        if self.last_chunk is None:
            raise RuntimeError("the stream ended without a token")
        res, usage = self.res, self.usage or {}
        res.e2e = now - self.start
        res.output_tokens = usage.get("completion_tokens", self.tokens_seen)
        res.prompt_tokens = usage.get("prompt_tokens", prompt_len)
        res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        res.ok = True
        return res


async def send_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> RequestResult:
    """One streamed completion; any failure comes back as a result with ok=False, never an exception."""
    timer = StreamTimer(time.perf_counter())
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")[:300]
                return RequestResult(error=f"HTTP {resp.status_code}: {body}")
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                timer.on_chunk(json.loads(data), time.perf_counter())
            if not done:
                raise RuntimeError("the stream ended without [DONE]")
        return timer.finish(time.perf_counter(), len(payload["prompt"]))
    except Exception as e:   # transport errors, error events, malformed chunks: one failed request, not a crash
        return RequestResult(error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


# ---- the run ----
@dataclass(frozen=True)
class RunConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    model: str | None = None
    request_rate: float = math.inf
    max_concurrency: int | None = None
    temperature: float = 0.0
    timeout_s: float = 3600.0
    seed: int = 0
    progress: bool = False


def make_client(cfg: RunConfig) -> httpx.AsyncClient:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    # No pool cap: with an infinite rate every request must be on the wire at once, and httpx's
    # default of 100 connections would queue the rest client-side (and time them out).
    return httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=httpx.Timeout(cfg.timeout_s, connect=30),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


class RunOutcome(NamedTuple):
    results: list[RequestResult]     # in request order
    duration_s: float                # first send to last finish
    client_cpu_s: float              # this process's CPU time meanwhile: a busy client delays timestamps


async def run_requests(client: httpx.AsyncClient, requests: list[BenchRequest], cfg: RunConfig,
                       offsets: list[float] | None = None) -> RunOutcome:
    """Send on the Poisson schedule (or at the given offsets from now, in seconds) under the concurrency cap."""
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    if offsets is None:
        offsets = arrival_times(len(requests), cfg.request_rate, cfg.seed)
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc="requests", file=sys.stderr)

    async def one(req: BenchRequest) -> RequestResult:
        payload = completion_payload(req, cfg.model, cfg.temperature)
        if sem is None:
            res = await send_request(client, "/v1/completions", payload)
        else:
            async with sem:
                res = await send_request(client, "/v1/completions", payload)
        if bar is not None:
            bar.update(1)
        return res

    start, cpu_start = time.perf_counter(), time.process_time()
    tasks = []
    for req, offset in zip(requests, offsets):
        # Sleep to an absolute offset so that scheduling delays don't accumulate into the rate.
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    duration, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if bar is not None:
        bar.close()
    return RunOutcome(list(results), duration, cpu)


@dataclass(frozen=True)
class Summary:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    requested_output_tokens: int       # over completed requests; equals total_output_tokens when honoured
    cached_tokens: int
    ttft: Stats
    itl: Stats
    e2e: Stats
    tpot: Stats
    errors: list[str]                  # the first few distinct failure messages
    client_cpu_util: float = 0.0       # the client's CPU seconds per wall second; near 1 it skews the timings


def summarize(requests: list[BenchRequest], results: list[RequestResult], duration_s: float,
              client_cpu_s: float = 0.0) -> Summary:
    done = [(q, r) for q, r in zip(requests, results) if r.ok]
    ok = [r for _, r in done]
    inp = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)
    errors = list(dict.fromkeys(r.error for r in results if not r.ok))[:5]
    return Summary(
        completed=len(ok), failed=len(results) - len(ok), duration_s=duration_s,
        request_throughput=len(ok) / duration_s, input_throughput=inp / duration_s,
        output_throughput=out / duration_s, total_input_tokens=inp, total_output_tokens=out,
        requested_output_tokens=sum(q.output_len for q, _ in done), cached_tokens=sum(r.cached_tokens for r in ok),
        ttft=Stats.of([r.ttft for r in ok]), itl=Stats.of([x for r in ok for x in r.itl]),
        e2e=Stats.of([r.e2e for r in ok]),
        tpot=Stats.of([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        errors=errors, client_cpu_util=client_cpu_s / duration_s)


def report(s: Summary, title: str) -> str:
    lines = [f"==== {title} ====",
             f"{'completed requests':<28}{s.completed}",
             f"{'failed requests':<28}{s.failed}",
             f"{'duration (s)':<28}{s.duration_s:.2f}",
             f"{'input tokens':<28}{s.total_input_tokens:,} ({s.cached_tokens:,} cached)",
             f"{'output tokens':<28}{s.total_output_tokens:,} (requested {s.requested_output_tokens:,})",
             f"{'request/s':<28}{s.request_throughput:.2f}",
             f"{'input tok/s':<28}{s.input_throughput:,.1f}",
             f"{'output tok/s':<28}{s.output_throughput:,.1f}",
             f"{'':<28}{'mean':>10}{'median':>10}{'p99':>10}  (ms)"]
    for name, st in (("TTFT", s.ttft), ("ITL", s.itl), ("TPOT", s.tpot), ("E2E", s.e2e)):
        lines.append(f"{name:<28}{st.mean_ms:>10.2f}{st.median_ms:>10.2f}{st.p99_ms:>10.2f}")
    lines.append(f"{'client CPU busy':<28}{s.client_cpu_util:.0%}")
    if s.client_cpu_util > CLIENT_BUSY_WARN:
        lines.append("warning: the client was busy most of the run; its timestamps lag (fewer streams or a "
                     "faster machine for the client)")
    lines += [f"error: {e}" for e in s.errors]
    return "\n".join(lines)


# ---- server helpers ----
async def server_model_info(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/get_model_info")
    r.raise_for_status()
    return r.json()


async def flush_cache(client: httpx.AsyncClient) -> None:
    """Drop the radix cache; the route refuses (400) while requests still hold it, so retry briefly."""
    for _ in range(FLUSH_RETRIES):
        r = await client.post("/flush_cache")
        if r.status_code == 200:
            return
        if r.status_code == 404:
            raise ValueError("the server has no /flush_cache route")
        await asyncio.sleep(0.5)
    raise ValueError(f"the server would not flush its cache: HTTP {r.status_code} {r.text[:200]}")


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
        info = await server_model_info(client)
        vocab = min(info["vocab_size"], args.max_token_id + 1) if args.max_token_id else info["vocab_size"]
        requests = build_requests(args, vocab)
        check_fits(requests, info["max_model_len"])
        if args.warmup:
            # Their own random prompts, so that warming up can't seed the prefix cache with the run's prompts.
            warm = random_requests(args.warmup, (WARMUP_INPUT_LEN,) * 2, (WARMUP_OUTPUT_LEN,) * 2, vocab,
                                   args.seed + 2)
            warm_cfg = RunConfig(**{**asdict(cfg), "request_rate": math.inf, "progress": False})
            results = (await run_requests(client, warm, warm_cfg)).results
            if not all(r.ok for r in results):
                print(f"warning: {sum(not r.ok for r in results)} warm-up request(s) failed: "
                      f"{next(r.error for r in results if not r.ok)}", file=sys.stderr)
        if args.flush_cache:
            await flush_cache(client)
        if args.client_processes > 1:
            from rlserve.bench.client_processes import run_in_processes
            run = await asyncio.to_thread(run_in_processes, requests, cfg, args.client_processes)
        else:
            run = await run_requests(client, requests, cfg)
        after = await server_state(client)
    summary = summarize(requests, *run)
    server = {k: info.get(k) for k in ("served_model_name", "model_path", "max_model_len", "vocab_size")}
    server.update(after)
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": run_config(args),
              "server": server, "num_requests": len(requests), **asdict(summary)}
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


async def server_state(client: httpx.AsyncClient) -> dict[str, Any]:
    """Device, dtype and KV bookkeeping after the run (kv_leaked should be 0); {} if unavailable."""
    try:
        r = await client.get("/get_server_info")
        r.raise_for_status()
        info = r.json()
    except Exception:     # an older or different server: the record just lacks these
        return {}
    return {k: info[k] for k in ("device", "dtype", "kv_total", "kv_leaked") if k in info}


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
    s.add_argument("--flush-cache", action="store_true", help="flush the server's prefix cache before the run")
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
