"""The serving targets in one command: prefix caching's gain and inter-token latency under load.

    python benchmarks/serving_targets.py --model qwen3-0.6b [--json-out FILE] [engine flags...]

1. A server with the radix cache on: the shared-prefix dataset (32 prefixes of 2,048 tokens × 16
   questions of 64, 256 output tokens each), then the random dataset at max concurrency 64 (1,024 in /
   256 out) for inter-token latency.
2. The same server with --disable-radix-cache: the same shared-prefix run.
Prints both shared-prefix output throughputs and their ratio, and the ITL figures. Each server is a
`python -m rlserve.server` subprocess on a free loopback port; any extra arguments go to both servers
(e.g. --load-format dummy, --kv-cache-dtype fp8_e4m3). The load generator runs in --client-processes
processes (default 4; see rlserve.bench.client_processes). The --groups/--questions/--prefix-len/
--output-len/--itl-* flags shrink the runs (the test suite uses tiny ones on CPU).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rlserve.bench import serving
from rlserve.bench.serving_stats import Summary, report
from rlserve.net import free_port

STARTUP_TIMEOUT_S = 900


class ServerProcess:
    """`python <command> --port P --log-level warning <args>` (command: `-m rlserve.server`, the server, by
    default) on a free port P, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, args: list[str], log_path: Path, command: list[str] | None = None) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = open(log_path, "w")
        cmd = [sys.executable, *(command or ["-m", "rlserve.server"]), "--port", self.url.rsplit(":", 1)[1],
               "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready within {STARTUP_TIMEOUT_S} s; log: {log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def bench_args(url: str, flags: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serving.add_arguments(parser)
    args = parser.parse_args(["--base-url", url, "--no-tqdm", *flags])
    serving.validate(args)
    return args


def run_bench(url: str, flags: list[str], label: str, results: dict) -> Summary:
    args = bench_args(url, flags)
    summary, record = asyncio.run(serving.bench(args))
    print(report(summary, f"{label}: {serving.title(args)}"), flush=True)
    results[label] = record
    return summary


def add_shared_prefix_args(ap: argparse.ArgumentParser) -> None:
    """The shared-prefix workload's size and its load generator (also used by frontend_load.py)."""
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--client-processes", type=int, default=4,
                    help="load-generator processes (one alone gets busy parsing 512 streams)")


def shared_prefix_flags(args: argparse.Namespace) -> list[str]:
    """`rlserve bench serving` flags for the workload of add_shared_prefix_args."""
    return ["--dataset", "shared-prefix", "--num-groups", str(args.groups), "--questions-per-group",
            str(args.questions), "--prefix-len", str(args.prefix_len), "--question-len", str(args.question_len),
            "--output-len", str(args.output_len), "--warmup", str(args.warmup),
            "--client-processes", str(args.client_processes)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_prefix_args(ap)
    ap.add_argument("--itl-prompts", type=int, default=256)
    ap.add_argument("--itl-input-len", type=int, default=1024)
    ap.add_argument("--itl-concurrency", type=int, default=64)
    ap.add_argument("--json-out", default=None, help="append one JSON line with every run's record")
    ap.add_argument("--log-dir", default=".", help="where the servers' logs go")
    args, server_args = ap.parse_known_args(argv)
    shared = [*shared_prefix_flags(args), "--flush-cache"]
    itl = ["--dataset", "random", "--num-prompts", str(args.itl_prompts), "--input-len", str(args.itl_input_len),
           "--output-len", str(args.output_len), "--max-concurrency", str(args.itl_concurrency),
           "--warmup", str(args.warmup), "--flush-cache",
           "--client-processes", str(min(args.client_processes, args.itl_concurrency))]
    logs = Path(args.log_dir)
    results: dict = {}
    with ServerProcess(server_args, logs / "server-radix-on.log") as server:
        on = run_bench(server.url, shared, "shared-prefix, radix on", results)
        lat = run_bench(server.url, itl, f"random, max concurrency {args.itl_concurrency}", results)
    with ServerProcess([*server_args, "--disable-radix-cache"], logs / "server-radix-off.log") as server:
        off = run_bench(server.url, shared, "shared-prefix, radix off", results)
    ratio = on.output_throughput / off.output_throughput if off.output_throughput else float("nan")
    print(f"shared-prefix output tok/s: radix on {on.output_throughput:,.1f}, off {off.output_throughput:,.1f} "
          f"→ {ratio:.2f}× (target ≥ 3×)")
    print(f"ITL at concurrency {args.itl_concurrency}: median {lat.itl.median_ms:.2f} ms, "
          f"p99 {lat.itl.p99_ms:.2f} ms (target: median ≤ 10 ms)")
    if args.json_out:
        line = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "server_args": server_args,
                "radix_speedup": ratio, "itl_median_ms": lat.itl.median_ms, "runs": results}
        with open(args.json_out, "a") as f:
            f.write(json.dumps(serving.json_safe(line), allow_nan=False) + "\n")
    failed = on.failed + off.failed + lat.failed
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
