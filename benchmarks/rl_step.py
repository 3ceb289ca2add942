"""Where one colocated RL step spends its time, and how fast weights reach the engine.

    python benchmarks/rl_step.py --model qwen3-0.6b --load-format dummy --dtype bfloat16 \\
        --prompts 64 --group-size 8 --max-tokens 512 --steps 3

Runs `rlserve.rl.train.train` itself (GRPO, one optimizer step per train step) on random token-id
prompts with every completion forced to `--max-tokens` (ignore_eos), so a step always does the same
work: rollout, logprob recompute, update, weight sync. The reward is a seeded random number: the
benchmark times the compute, which doesn't depend on what the reward says. Step 0 carries the one-off
costs (kernels compiled and autotuned on first use, the optimizer's state allocated), so the summary is
the median of the later steps.

`--override rollout.backend=server` times server mode instead: the trainer launches a server with the
same engine options and pushes its weights to it before every rollout (`push_s`: pause, weights through
CUDA IPC, continue).

Weight sync is measured twice after training: the colocated path the loop uses (the engine serves the
trainer's module, so a sync is only a prefix-cache flush) and `Engine.update_weights` from a second copy
of the weights on the same device (what a trainer holding its own copy would call), per GB of weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from rlserve.bench.offline import sync_device
from rlserve.rl.config import load_config
from rlserve.rl.prompts import PromptStream

# sync_s: colocated mode's weight sync; push_s: server mode's pause → weights → continue.
PHASES = ("rollout_s", "logprob_s", "update_s", "sync_s", "push_s", "total_s")


def _random_prompts(n: int, length: int, vocab: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(vocab) for _ in range(length)]} for _ in range(n)]


def measure_weight_sync(engine: Any, repeats: int = 5) -> dict[str, float]:
    """Median ms of the colocated sync (flush) and of update_weights from a same-device copy."""
    device = next(engine.model.parameters()).device
    source = copy.deepcopy(engine.model)
    gigabytes = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 1e9
    flush, copy_ms = [], []
    for _ in range(repeats):
        sync_device(device)
        start = time.perf_counter()
        engine.flush_cache()
        flush.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        with torch.no_grad():
            engine.update_weights(source)
        sync_device(device)
        copy_ms.append((time.perf_counter() - start) * 1e3)
    del source
    return {"weights_gb": gigabytes, "colocated_sync_ms": statistics.median(flush),
            "update_weights_ms": statistics.median(copy_ms),
            "update_weights_ms_per_gb": statistics.median(copy_ms) / gigabytes}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rlserve.llm import LLM
    from rlserve.rl.train import train

    overrides = [
        f"model.path={args.model}", f"model.load_format={args.load_format}", f"model.dtype={args.dtype}",
        f"model.device={args.device}", f"steps={args.steps}", f"seed={args.seed}",
        f"task.prompts_per_step={args.prompts}", "task.eval_every=0",
        f"rollout.group_size={args.group_size}", f"rollout.max_tokens={args.max_tokens}",
        "rollout.ignore_eos=true", "rollout.temperature=1.0",
        f"algorithm.micro_batch_size={args.micro_batch}", "logging.progress_bar=false",
    ]
    # A KV pool that holds the whole rollout at once (prompts shared by their group) and leaves the rest
    # of the device to the trainer; the engine's default would take most of a GPU.
    kv_tokens = args.max_total_tokens or (args.prompts * (args.prompt_len + args.group_size * args.max_tokens)
                                          + 4096)
    overrides.append(f"model.max_total_tokens={kv_tokens}")
    cfg = load_config(None, overrides + list(args.override))
    rng = random.Random(args.seed)
    prompts = PromptStream(items=_random_prompts(args.prompts * args.steps, args.prompt_len, args.prompt_vocab,
                                                 args.seed))
    with tempfile.TemporaryDirectory() as out_dir:
        cfg.output_dir = out_dir
        history = train(cfg, reward_fn=lambda prompt, completion, **_: rng.random(), prompts=prompts, held_out=[])
    # The sync figures come from an engine of their own (the training run's is gone with train()).
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_total_tokens=4096)
    engine = llm.engine
    sync = measure_weight_sync(engine)
    steady = history[1:] or history
    summary = {phase: statistics.median(r.get(phase, 0.0) for r in steady) for phase in PHASES}
    tokens = args.prompts * args.group_size * args.max_tokens
    summary["rollout_tok_per_s"] = tokens / summary["rollout_s"]
    return {"config": {k: v for k, v in vars(args).items() if k != "json_out"},
            "device": str(engine.device) + (f" ({torch.cuda.get_device_name(engine.device)})"
                                            if engine.device.type == "cuda" else ""),
            "steps": [{p: r.get(p, 0.0) for p in PHASES} for r in history], "median_after_first": summary,
            "weight_sync": sync}


def report(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}",
             "step  " + "  ".join(f"{p[:-2]:>9}" for p in PHASES)]
    for i, r in enumerate(result["steps"]):
        lines.append(f"{i:>4}  " + "  ".join(f"{r[p]:>8.2f}s" for p in PHASES))
    m = result["median_after_first"]
    lines.append(" med  " + "  ".join(f"{m[p]:>8.2f}s" for p in PHASES))
    lines.append(f"rollout throughput: {m['rollout_tok_per_s']:,.0f} output tok/s")
    s = result["weight_sync"]
    lines.append(f"weight sync ({s['weights_gb']:.3f} GB): colocated {s['colocated_sync_ms']:.3f} ms; "
                 f"update_weights {s['update_weights_ms']:.2f} ms = {s['update_weights_ms_per_gb']:.2f} ms/GB")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prompt-vocab", type=int, default=10000, help="prompt ids are drawn from [0, N)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8, help="samples per trainer forward/backward")
    p.add_argument("--max-total-tokens", type=int, default=0,
                   help="KV pool size (0: room for the whole rollout at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", nargs="*", default=[], help="extra dotted config overrides")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
