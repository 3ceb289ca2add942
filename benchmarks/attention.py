"""Decode-attention micro-benchmark: the triton backend vs the torch reference over one KV pool layer.

    python benchmarks/attention.py [--batch 64 128 256] [--context 1024] [--splits 1 2 4 8]
                                   [--slots runs] [--kv-cache-dtype fp8_e4m3] [--sweep]

Shapes default to qwen3-0.6b (16 query heads, 8 kv heads, head_dim 128, bf16). Contexts are drawn
uniformly from ±25% around --context and scattered over random pool slots, as a busy server leaves
them (`--slots runs`: each sequence in consecutive slots, as a fresh engine's allocator hands them
out). Bandwidth counts the K and V bytes of every context token once, the least a decode step must
read (an fp8 pool's scales included); the device-to-device copy rate printed first is the practical
ceiling.
"""
from __future__ import annotations

import argparse
import itertools
import random
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from rlserve.config import parse_dtype
from rlserve.kv_pool import FP8_DTYPE, KVPool
from rlserve.layers.attention import triton_decode
from rlserve.layers.attention.base import ForwardBatch
from rlserve.layers.attention.torch_backend import TorchAttentionBackend

if __package__ in (None, ""):     # run as `python benchmarks/attention.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import graph_time_ms, overriding, time_ms  # noqa: E402


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=10, inner=5)
    return 2 * nbytes / ms / 1e6


def decode_batch(batch_size: int, context: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 seed: int, runs: bool = False) -> tuple[KVPool, ForwardBatch, list[int]]:
    rng = random.Random(seed)
    seq = [rng.randint(context * 3 // 4, context * 5 // 4) for _ in range(batch_size)]
    total = sum(seq)
    pool = KVPool(1, total + 1, kv_heads, head_dim, dtype, "cuda")
    for buf in pool.k_buffers + pool.v_buffers:
        buf.normal_()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    slots = (torch.arange(total, device="cuda") if runs
             else torch.randperm(total, device="cuda", generator=gen)) + 1
    table = torch.zeros(batch_size, max(seq), dtype=torch.int64, device="cuda")
    at = 0
    for i, s in enumerate(seq):
        table[i, :s] = slots[at:at + s]
        at += s
    seq_t = torch.tensor(seq, device="cuda")
    rows = torch.arange(batch_size, device="cuda")
    batch = ForwardBatch(
        input_ids=torch.zeros(batch_size, dtype=torch.int64, device="cuda"), positions=seq_t - 1,
        out_cache_loc=table[rows, seq_t - 1], req_rows=rows, seq_lens=seq_t,
        extend_lens=torch.ones(batch_size, dtype=torch.int64, device="cuda"),
        seq_lens_cpu=seq, extend_lens_cpu=[1] * batch_size, is_decode=True, logits_indices=rows,
        req_to_token=table)
    return pool, batch, seq


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8],
                   help="fixed KV-split counts to time beside the automatic choice")
    p.add_argument("--slots", choices=["scattered", "runs"], default="scattered",
                   help="random pool slots, or each sequence's slots consecutive")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"],
                   help="the pool's dtype: the model dtype, or e4m3 with per-(slot, head) scales")
    p.add_argument("--sweep", action="store_true",
                   help="time decode launch configs (BLOCK_N, warps, stages) for bf16 and fp8 pools instead")
    p.add_argument("--maxnreg", type=int, nargs="*", default=[0],
                   help="with --sweep: register caps a thread to try (0: the compiler's choice)")
    args = p.parse_args(argv)
    if args.sweep:
        return sweep(args)
    if not torch.cuda.is_available():
        raise SystemExit("the attention benchmark needs a CUDA device")
    dtype = parse_dtype(args.dtype)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"heads {args.heads}/{args.kv_heads}  head_dim {args.head_dim}  {dtype}  KV {args.kv_cache_dtype}")
    print(f"device-to-device copy: {copy_bandwidth_gbs():.0f} GB/s (read + write)")
    header = f"{'batch':>5} {'ctx':>5} {'backend':<18} {'mode':<6} {'us':>9} {'GB/s':>7}"
    print(header)
    print("-" * len(header))
    for bs in args.batch:
        time_batch(args, bs, dtype)
        torch.cuda.empty_cache()     # this batch's pool is gone with time_batch's frame


def time_batch(args: argparse.Namespace, bs: int, dtype: torch.dtype) -> None:
    """One batch size: torch, triton with its own split count and with each of --splits, then the KV store."""
    from rlserve.layers.attention.triton_backend import TritonAttentionBackend, store_kv

    sms = triton_decode.num_sms(torch.device("cuda"))
    scale = args.head_dim ** -0.5
    pool, batch, seq = decode_batch(bs, args.context, args.kv_heads, args.head_dim, dtype, seed=bs,
                                    runs=args.slots == "runs")
    if args.kv_cache_dtype == "fp8_e4m3":
        pool = fp8_copy(pool)
    kv_bytes = sum(seq) * _bytes_per_token(pool)
    q = torch.randn(bs, args.heads, args.head_dim, dtype=dtype, device="cuda")
    k = torch.randn(bs, args.kv_heads, args.head_dim, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    auto = triton_decode.decode_kv_splits(bs, args.kv_heads, sms)
    # (name, backend, split count forced over decode_kv_splits' choice, or None)
    runs: list[tuple[str, object, int | None]] = [
        ("torch", TorchAttentionBackend(pool, scale), None),
        (f"triton auto={auto}", TritonAttentionBackend(pool, scale), None)]
    runs += [(f"triton splits={s}", TritonAttentionBackend(pool, scale), s) for s in args.splits if s != auto]
    ctx = round(sum(seq) / bs)
    outputs = {}
    for name, backend, splits in runs:
        def prepare(b=backend, n=splits) -> None:
            with overriding(triton_decode, "decode_kv_splits", lambda *a, **k: n) if n else nullcontext():
                b.prepare(batch)
        prepare()
        fn = lambda b=backend: b.forward(q, k, v, 0, batch)
        outputs[name] = fn()
        modes = [("eager", time_ms(fn))]
        if name != "torch":
            prepare()
            modes.append(("graph", graph_time_ms(fn)))
        for mode, ms in modes:
            print(f"{bs:>5} {ctx:>5} {name:<18} {mode:<6} {ms * 1e3:>9.1f} {kv_bytes / ms / 1e6:>7.0f}")
    ref = outputs["torch"].float()
    worst = max((o.float() - ref).abs().max().item() for o in outputs.values())
    print(f"      max |triton - torch| over the runs above: {worst:.2e}")

    loc = batch.out_cache_loc
    kb, vb = pool.k_buffers[0], pool.v_buffers[0]
    scales = (pool.k_scales[0], pool.v_scales[0]) if pool.k_scales and pool.v_scales else (None, None)
    fused = time_ms(lambda: store_kv(kb, vb, loc, k, v, *scales))
    indexed = time_ms(lambda: pool.store(0, loc, k, v))
    print(f"      kv store of {bs} tokens: triton {fused * 1e3:.1f} us, index_put {indexed * 1e3:.1f} us")


def _bytes_per_token(pool: KVPool) -> int:
    """K and V bytes a decode step reads per context token, scales included."""
    return KVPool.bytes_per_token(1, pool.num_kv_heads, pool.head_dim, pool.dtype)


def fp8_copy(pool: KVPool) -> KVPool:
    out = KVPool(pool.num_layers, pool.num_slots, pool.num_kv_heads, pool.head_dim, FP8_DTYPE, "cuda")
    every = torch.arange(pool.num_slots, device="cuda")
    for layer in range(pool.num_layers):
        out.store(layer, every, pool.k_buffers[layer], pool.v_buffers[layer])
    return out


def sweep(args: argparse.Namespace) -> None:
    """Decode kernel launch configs, graph-timed, bf16 vs fp8 pools; bandwidth counts stored bytes."""
    from rlserve.layers.attention.triton_backend import TritonAttentionBackend
    dtype = parse_dtype(args.dtype)
    scale = args.head_dim ** -0.5
    for bs in args.batch:
        pool, batch, seq = decode_batch(bs, args.context, args.kv_heads, args.head_dim, dtype, seed=bs,
                                          runs=args.slots == "runs")
        q = torch.randn(bs, args.heads, args.head_dim, dtype=dtype, device="cuda")
        k = torch.randn(bs, args.kv_heads, args.head_dim, dtype=dtype, device="cuda")
        v = torch.randn_like(k)
        for kv_name, kv_pool in (("bf16", pool), ("fp8", fp8_copy(pool))):
            kv_bytes = sum(seq) * _bytes_per_token(kv_pool)
            for block_n in (32, 64, 128):
                for warps in (1, 2, 4, 8):
                    for stages, regs in itertools.product((1, 2, 3, 4), args.maxnreg):
                        launch = (block_n, warps, stages, regs or None)
                        backend = TritonAttentionBackend(kv_pool, scale)
                        backend.prepare(batch)
                        name = f"{bs:>5} {kv_name} N={block_n:<3} w={warps} s={stages} r={regs or '-':<3}"
                        try:
                            with overriding(triton_decode, "decode_launch_config", lambda *a, c=launch, **k: c):
                                ms = graph_time_ms(lambda b=backend: b.forward(q, k, v, 0, batch))
                        except Exception as e:  # e.g. out of shared memory for a large tile
                            print(f"{name}: {type(e).__name__}")
                            continue
                        print(f"{name} {ms * 1e3:>8.1f} us {kv_bytes / ms / 1e6:>6.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
