"""Synchronous against asynchronous agentic GRPO: the same run in each mode, one after another (each alone
on the machine), and samples per second beside the synchronous one.

    python benchmarks/agent_modes.py --steps 16 --modes off one_step_off full:4x8 full:32x1 \
        -- rollout.backend=server model.max_total_tokens=65536

Each mode runs `rlserve train --config examples/agent_calculator.yaml` (or `--config`) with
`asynchronous.mode` set, `steps` and `task.eval_every` = --steps (held-out accuracy before and after), its
own output directory under --out, and the arguments after `--`. `full:PxG` is the fully asynchronous mode
with P producers of G groups each and `asynchronous.max_staleness` = --max-staleness; `full:PxG:S` sets
that bound to S for this mode alone. A mode ending in `+proc` draws in a child process
(`asynchronous.rollout_process=true`). From each run's
metrics.jsonl: samples/s = samples of the steps / (their wall time less the in-loop evaluation), the mean
per step of each part (rollout or the wait for it, logprobs, update, the rest of the step), groups dropped
as stale, and held-out accuracy before → after. `--summarize DIR` prints the table of runs already made.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PARTS = ("rollout_s", "rollout_wait_s", "logprob_s", "update_s")
TIMED = (*PARTS, "push_s", "sync_s", "eval_s")


@dataclass
class ModeResult:
    mode: str
    steps: int
    seconds: float              # the steps' wall time, in-loop evaluation left out
    samples: int
    parts: dict[str, float]     # mean seconds a step: rollout (or its wait), logprobs, update, rest
    dropped: int
    accuracy: list[float]       # held-out accuracy as logged: before training, then at each evaluation

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def mode_args(mode: str, max_staleness: int) -> list[str]:
    """`off`, `one_step_off`, `full:PxG` or `full:PxG:S` (each + `+proc` but off) as overrides of the run's
    config."""
    if mode.endswith("+proc") and mode != "off+proc":
        return [*mode_args(mode.removesuffix("+proc"), max_staleness), "asynchronous.rollout_process=true"]
    if mode in ("off", "one_step_off"):
        return [f"asynchronous.mode={mode}"]
    name, _, rest = mode.partition(":")
    shape, _, bound = rest.partition(":")
    producers, _, groups = shape.partition("x")
    if (name != "full" or not producers.isdigit() or not groups.isdigit()
            or not (bound == "" and ":" not in rest or bound.isdigit())):
        raise ValueError(f"a mode is off, one_step_off, full:PxG (P producers of G groups) or full:PxG:S "
                         f"(staleness bound S), got {mode!r}")
    if bound:
        max_staleness = int(bound)
    return ["asynchronous.mode=full", f"asynchronous.max_staleness={max_staleness}",
            f"asynchronous.producers={producers}", f"asynchronous.groups_in_flight={groups}"]


def summarize(mode: str, metrics: Path, samples_per_step: int) -> ModeResult:
    """One run's figures from its metrics.jsonl (see the module notes)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("step", -1) >= 0]
    if not steps:
        raise ValueError(f"{metrics}: no step was logged")
    seconds = steps[-1]["elapsed_s"] - sum(r.get("eval_s", 0.0) for r in steps)
    parts = {k: sum(r.get(k, 0.0) for r in steps) / len(steps) for k in PARTS}
    parts["rest_s"] = sum(r["total_s"] - sum(r.get(k, 0.0) for k in TIMED) for r in steps) / len(steps)
    return ModeResult(mode, len(steps), seconds, samples_per_step * len(steps), parts,
                      int(sum(r.get("groups_dropped_stale", 0) for r in steps)),
                      [r["eval_accuracy"] for r in rows if "eval_accuracy" in r])


def table(results: Sequence[ModeResult]) -> str:
    base = results[0].samples_per_s if results else 0.0
    lines = ["| mode | held-out before → after | steps | wall | samples/s | × first | per step (means): "
             "rollout, wait for it, logprobs, update, rest | groups dropped |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in results:
        acc = " → ".join(f"{a:.1%}" for a in (r.accuracy[:1] + r.accuracy[-1:] if len(r.accuracy) > 1 else r.accuracy))
        parts = ", ".join(f"{r.parts[k]:.2f}" for k in (*PARTS, "rest_s"))
        ratio = r.samples_per_s / base if base else 0.0
        lines.append(f"| {r.mode} | {acc or '—'} | {r.steps} | {r.seconds:.1f} s | {r.samples_per_s:.1f} | "
                     f"{ratio:.2f} | {parts} s | {r.dropped} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/agent_calculator.yaml")
    ap.add_argument("--modes", nargs="+", default=["off", "one_step_off", "full:4x8"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--max-staleness", type=int, default=1)
    ap.add_argument("--samples-per-step", type=int, default=128, help="prompts_per_step × group_size")
    ap.add_argument("--timeout", type=float, default=None, help="seconds a run may take before it is stopped")
    ap.add_argument("--out", default="runs/agent-modes")
    ap.add_argument("--summarize", default=None, help="print the table of runs already in this directory")
    args = ap.parse_args(argv)
    out = Path(args.summarize or args.out)
    for mode in args.modes:
        mode_args(mode, args.max_staleness)          # a bad mode fails before any run starts
    results = []
    for mode in args.modes:
        run_dir = out / mode.replace(":", "-").replace("+", "-")
        if args.summarize is None:
            cmd = [sys.executable, "-m", "rlserve.cli", "train", "--config", args.config, f"steps={args.steps}",
                   f"task.eval_every={args.steps}", "logging.progress_bar=false", "checkpoint_every=0",
                   f"output_dir={run_dir}", *mode_args(mode, args.max_staleness), *extra]
            print(f"== {mode}: {' '.join(cmd[2:])}", flush=True)
            start = time.perf_counter()
            try:
                rc = subprocess.run(cmd, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timed out"
            print(f"== {mode}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            results.append(summarize(mode, metrics, args.samples_per_step))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
