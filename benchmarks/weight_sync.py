"""How long a trainer takes to push its weights into a running rlserve server on the same device.

    python benchmarks/weight_sync.py --models qwen3-0.6b qwen3-1.7b llama-3.1-8b --repeat 3

For each model a server starts (`python -m rlserve.server`, dummy weights, bf16) and this process plays
the trainer: it holds its own copy of the weights on the same device (random values, the model's HF
parameter names) and times, end to end as a client sees it, pause (in_place) → update → continue:

- `tensor`: POST /update_weights_from_tensor with CUDA IPC handles, one call per 512 MiB bucket of
  tensors (the default), the engine copying each tensor into place;
- `bucket`: the same with load_format=flattened_bucket (the trainer packs each bucket into one buffer,
  one IPC handle a call);
- `disk` (with --disk, for reference): a safetensors directory written by the trainer, then
  POST /update_weights_from_disk; the write and the update are reported apart.

After each path one tensor read back through /get_weights_by_name must equal the trainer's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rlserve.client import Client  # noqa: E402
from rlserve.config import CacheConfig, EngineConfig  # noqa: E402
from rlserve.rl.remote import LaunchedServer  # noqa: E402

PROBE_ROWS = 2


def trainer_weights(model: str, device: torch.device, dtype: torch.dtype, seed: int) -> list[tuple[str, torch.Tensor]]:
    """A trainer's copy of `model`'s parameters: each its own allocation, random, HF names."""
    from rlserve.config import Elementwise, ModelConfig
    from rlserve.layers.fused import Kernels
    from rlserve.models.llama import LlamaForCausalLM
    from rlserve.models.loader import resolve_model

    cfg = ModelConfig.from_hf(resolve_model(model, "dummy").hf_config)
    torch.manual_seed(seed)
    with torch.device("meta"):
        shapes = LlamaForCausalLM(cfg, Kernels.for_mode(Elementwise.EAGER))
    return [(name, torch.randn(p.shape, device=device, dtype=torch.float32).to(dtype) * 0.02)
            for name, p in shapes.named_parameters()]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def check(client: Client, pairs: list[tuple[str, torch.Tensor]]) -> None:
    name, t = pairs[len(pairs) // 2]
    got = torch.tensor(client.get_weights_by_name(name, truncate_size=PROBE_ROWS), dtype=torch.float32)
    if not torch.equal(got, t[:PROBE_ROWS].float().cpu()):
        raise AssertionError(f"{name} on the server differs from the trainer's after the update")


def push(client: Client, update: Callable[[], Any]) -> None:
    client.pause_generation("in_place")
    try:
        update()
    finally:
        client.continue_generation()


def phases(client: Client, pairs: list[tuple[str, torch.Tensor]], repeat: int) -> dict[str, float]:
    """Median ms of each part of a direct-handle push (one call): pause, the client's serialization of
    the handles, the update call (the server opens the handles and copies), continue."""
    from rlserve.client import _serialize

    parts: dict[str, list[float]] = {"pause": [], "serialize": [], "update call": [], "continue": []}
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        client.pause_generation("in_place")
        t1 = time.perf_counter()
        payload = _serialize(pairs, None)
        t2 = time.perf_counter()
        client.update_weights_from_serialized(payload, None, "phases")
        t3 = time.perf_counter()
        client.continue_generation()
        t4 = time.perf_counter()
        for key, (a, b) in zip(parts, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
            parts[key].append((b - a) * 1e3)
    return {key: statistics.median(ms) for key, ms in parts.items()}


def bench_model(model: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = EngineConfig(model=model, load_format="dummy", dtype=args.dtype, device=args.device,
                          cache=CacheConfig(max_total_tokens=args.kv_tokens))
    server = LaunchedServer(config, log_dir / f"server-{model}.log")
    client = Client(server.url, timeout=1800)
    try:
        server.wait_ready(client)
        pairs = trainer_weights(model, device, dtype, args.seed)
        gb = sum(t.numel() * t.element_size() for _, t in pairs) / 1e9
        result: dict[str, Any] = {"model": model, "weights_gb": gb, "tensors": len(pairs)}
        for mb in args.bucket_mb:
            suffix = "" if mb == args.bucket_mb[0] else f"@{mb or 'one'}"
            for path, fmt in (("tensor", None), ("bucket", "flattened_bucket")):
                per_call = "auto" if mb < 0 else (mb << 20 if mb else None)
                ms = timed(lambda: push(client, lambda: client.update_weights_from_tensor(
                    pairs, load_format=fmt, weight_version=path, bucket_bytes=per_call)), args.repeat)
                check(client, pairs)
                result[path + suffix] = {"ms": ms, "median_ms": statistics.median(ms),
                                         "ms_per_gb": statistics.median(ms) / gb, "bucket_mb": mb}
        result["phases_ms"] = phases(client, pairs, args.repeat)
        # The route pauses generation in place around its copy and continues after it: a client that
        # sends no pause/continue of its own still gets a paused update, in one round trip.
        ms = timed(lambda: client.update_weights_from_tensor(pairs, weight_version="alone"), args.repeat)
        check(client, pairs)
        result["tensor alone"] = {"ms": ms, "median_ms": statistics.median(ms),
                                  "ms_per_gb": statistics.median(ms) / gb, "bucket_mb": -1}
        if args.disk:
            with tempfile.TemporaryDirectory(prefix="rlserve-sync-", dir=args.disk_dir) as tmp:
                write_ms = timed(lambda: write_checkpoint(model, pairs, Path(tmp)), 1)
                ms = timed(lambda: push(client, lambda: client.update_weights_from_disk(tmp, weight_version="disk")),
                           args.repeat)
            check(client, pairs)
            result["disk"] = {"write_ms": write_ms[0], "ms": ms, "median_ms": statistics.median(ms),
                              "ms_per_gb": statistics.median(ms) / gb}
        return result
    finally:
        client.close()
        server.stop()
        # The server's own split of each direct-handle update (reading the handles, the paused copy).
        log = log_dir / f"server-{model}.log"
        lines = [ln for ln in log.read_text().splitlines() if "update_weights_from_tensor:" in ln] if log.exists() else []
        for ln in lines[-3:]:
            print(f"  [{model} server] {ln.split('update_weights_from_tensor: ', 1)[-1]}")


def write_checkpoint(model: str, pairs: list[tuple[str, torch.Tensor]], out: Path) -> None:
    """An HF directory (config.json + one safetensors file) holding `pairs`."""
    from safetensors.torch import save_file

    from rlserve.models.loader import resolve_model

    resolve_model(model, "dummy").hf_config.save_pretrained(out)
    save_file({n: t.contiguous() for n, t in pairs}, str(out / "model.safetensors"))
    os.sync()


def report(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<14} {'GB':>6} {'tensors':>7}  {'tensor/IPC':>18}  {'bucket/IPC':>18}  {'disk':>24}"]
    for r in rows:
        def cell(key: str) -> str:
            if key not in r:
                return "-"
            return f"{r[key]['median_ms']:8.1f} ms {r[key]['ms_per_gb']:5.1f}/GB"
        disk = cell("disk") + (f" (+{r['disk']['write_ms'] / 1e3:.1f} s write)" if "disk" in r else "")
        lines.append(f"{r['model']:<14} {r['weights_gb']:6.2f} {r['tensors']:7d}  {cell('tensor'):>18}  "
                     f"{cell('bucket'):>18}  {disk:>24}")
        for key in sorted(k for k in r if k.startswith("tensor@")):
            other = "bucket" + key.removeprefix("tensor")
            lines.append(f"{'  MiB/call ' + key.split('@')[1]:<30}  {cell(key):>18}  {cell(other):>18}")
        if "tensor alone" in r:
            lines.append(f"  direct handles, one call, no separate pause/continue (the route pauses in place): "
                         f"{cell('tensor alone')}")
        if "phases_ms" in r:
            lines.append("  direct handles, one call: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["phases_ms"].items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b", "llama-3.1-8b"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cuda (trainer and server share it) or cpu (shared memory)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--kv-tokens", type=int, default=65536, help="the server's KV pool (small: it is not used)")
    p.add_argument("--bucket-mb", type=int, nargs="+", default=[-1],
                   help="MiB per update call, one run each: -1 the client's default (one call for direct "
                        "handles, 512 MiB flattened buckets), 0 one call, N at most N MiB")
    p.add_argument("--disk", action="store_true", help="also time the safetensors path")
    p.add_argument("--disk-dir", default=None, help="where the disk path writes (default: the temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rlserve-sync-logs-") as logs:
        rows = [bench_model(m, args, Path(logs)) for m in args.models]
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    print(report(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
