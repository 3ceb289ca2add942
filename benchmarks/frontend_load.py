"""The HTTP front end under load, with a stand-in engine that keeps a fixed step time.

    python benchmarks/frontend_load.py --step-ms 13 [--max-running 512] [--groups ... --output-len ...]

The engine process is replaced by a loop with no model: it admits up to --max-running requests and,
every --step-ms, gives each running request one token, as a device-bound engine at that pace would.
`rlserve bench serving` then runs the shared-prefix workload of serving_targets.py against it. The
stand-in could stream `running / step` tokens a second; what the run gets below that is the front
end's cost (and the client's, which the report's client line shows), measured without a GPU. The front
end (routes, validation, streaming, metrics) is the real one; the tokenizer is the default model's.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

if __package__ in (None, ""):     # run as `python benchmarks/frontend_load.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAKE_VOCAB = 49152
FAKE_TOKEN = 330


def stand_in_engine(config: Any, in_addr: str, out_addr: str, *, step_s: float, max_running: int) -> None:
    """Speaks the engine process's protocol (rlserve.server.ipc) with no model behind it."""
    import zmq

    from rlserve.server import ipc

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(in_addr)
    push = ctx.socket(zmq.PUSH)
    push.connect(out_addr)
    push.send(ipc.encoder.encode(ipc.Ready({"max_model_len": 1 << 16, "vocab_size": FAKE_VOCAB,
                                            "architecture": "LlamaForCausalLM", "kv_total": 0,
                                            "device": "none", "dtype": "none"})))
    waiting: deque[tuple[str, int, int]] = deque()       # (rid, tokens to give, prompt length)
    running: dict[str, list[int]] = {}                   # rid → [tokens left, prompt length]
    steps = 0

    def end(rid: str, prompt_len: int, reason: str) -> ipc.Update:
        return ipc.Update(rid, [ipc.SeqDelta(0, "", [], None, reason)], prompt_len, 0, True)

    next_step = time.perf_counter()
    while True:
        wait_ms = max(0.0, (next_step - time.perf_counter()) * 1e3)
        updates: list[ipc.Update] = []
        if pull.poll(wait_ms):
            while True:
                try:
                    cmd = ipc.command_decoder.decode(pull.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(cmd, ipc.AddRequest):
                    waiting.append((cmd.rid, int(cmd.params.get("max_tokens") or 16), len(cmd.prompt_ids)))
                elif isinstance(cmd, ipc.Abort):
                    for rid in [cmd.rid] if cmd.rid is not None else list(running) + [w[0] for w in waiting]:
                        if rid in running:
                            updates.append(end(rid, running.pop(rid)[1], "abort"))
                        for w in [w for w in waiting if w[0] == rid]:
                            waiting.remove(w)
                            updates.append(end(rid, w[2], "abort"))
                elif isinstance(cmd, ipc.Query):
                    data = {"success": True} if cmd.what == "flush_cache" else {
                        "num_running": len(running), "num_waiting": len(waiting), "kv_leaked": 0,
                        "stats": {"decode_steps": steps}}
                    push.send(ipc.encoder.encode(ipc.Reply(cmd.qid, data)))
                elif isinstance(cmd, ipc.Shutdown):
                    push.close(linger=1000)
                    return
        now = time.perf_counter()
        if now >= next_step:
            while waiting and len(running) < max_running:
                rid, n, prompt_len = waiting.popleft()
                running[rid] = [n, prompt_len]
            for rid, state in list(running.items()):
                state[0] -= 1
                done = state[0] <= 0
                updates.append(ipc.Update(rid, [ipc.SeqDelta(0, "a", [FAKE_TOKEN], None, "length" if done else None)],
                                          state[1], 0, done))
                if done:
                    del running[rid]
            steps += 1
            next_step = max(next_step + step_s, now)     # a late step is not made up for
        if updates:
            push.send(ipc.encoder.encode(ipc.Updates(updates)))


def serve(argv: list[str]) -> int:
    """The server with the stand-in engine (the subprocess the benchmark starts)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log-level", default="warning")
    ap.add_argument("--step-ms", type=float, required=True)
    ap.add_argument("--max-running", type=int, required=True)
    a = ap.parse_args(argv)
    from rlserve.config import EngineConfig
    from rlserve.server import frontend
    from rlserve.server.app import run_server
    from rlserve.server.state import ServerArgs

    frontend.run_engine = functools.partial(stand_in_engine, step_s=a.step_ms / 1e3, max_running=a.max_running)
    return run_server(ServerArgs(engine=EngineConfig(), port=a.port, log_level=a.log_level))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    from benchmarks.serving_targets import ServerProcess, add_shared_prefix_args, bench_args, shared_prefix_flags
    from rlserve.bench import serving
    from rlserve.bench.serving_stats import report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-ms", type=float, default=13.0, help="the stand-in engine's step time (default 13)")
    ap.add_argument("--max-running", type=int, default=512)
    add_shared_prefix_args(ap)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--log-dir", default=".")
    a = ap.parse_args(argv)
    flags = shared_prefix_flags(a)
    requests = a.groups * a.questions
    ideal = min(requests, a.max_running) / (a.step_ms / 1e3)
    server_args = ["--step-ms", str(a.step_ms), "--max-running", str(a.max_running)]
    with ServerProcess(server_args, Path(a.log_dir) / "server-frontend-load.log",
                       command=[str(Path(__file__).resolve())]) as server:
        for _ in range(a.repeat):
            cpu0 = cpu_seconds(server.proc.pid)
            summary, _ = asyncio.run(serving.bench(bench_args(server.url, flags)))
            cpu = cpu_seconds(server.proc.pid) - cpu0
            print(report(summary, f"front end, stand-in engine at {a.step_ms:g} ms a step"), flush=True)
            print(f"stand-in engine's pace: {ideal:,.0f} output tok/s at full batch; the run got "
                  f"{summary.output_throughput:,.0f} ({summary.output_throughput / ideal:.0%}); API server CPU "
                  f"{cpu / summary.duration_s:.0%} busy, {cpu * 1e6 / max(summary.total_output_tokens, 1):.1f} "
                  f"µs per output token", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--port":
        sys.exit(serve(sys.argv[1:]))
    sys.exit(main())
