"""Cascade decode attention (a shared prefix read once per group) against the torch reference over
the same pool, and the engine end to end: same greedy tokens with and without it."""
from __future__ import annotations

import os
import random

import pytest
import torch

from rlserve.kv_pool import KVPool
from rlserve.layers.attention.base import ForwardBatch, SharedPrefixes
from rlserve.layers.attention.torch_backend import TorchAttentionBackend

# On a CPU, TRITON_INTERPRET=1 runs the kernels in triton's interpreter (slow, for development).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs a CUDA device (or TRITON_INTERPRET=1)"),
]
TOL = {torch.float32: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def shared_case(groups: list[tuple[int, int]], loners: int, heads: int, kv_heads: int, dim: int,
                dtype: torch.dtype, max_members: int, seed: int = 0):
    """groups: (members, shared length). Members of a group point at the same slots for the shared
    prefix and at slots of their own after it; loners share nothing. Returns the pool, a decode batch
    carrying the shared prefixes, and q/k/v."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    own = [rng.randint(1, 300) for _ in range(sum(m for m, _ in groups) + loners)]
    shared_total = sum(n for _, n in groups)
    seq_lens, starts, members_lists, lengths, group_rows = [], [], [], [], []
    num_slots = shared_total + sum(own) + 64
    perm = (torch.randperm(num_slots - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(own) + 2, max(n for _, n in groups) + max(own) + 2, dtype=torch.int64)
    b, at = 0, 0
    for members, n in groups:
        prefix = perm[at:at + n]
        at += n
        group = []
        for _ in range(members):
            table[b, :n] = torch.tensor(prefix)
            table[b, n:n + own[b]] = torch.tensor(perm[at:at + own[b]])
            at += own[b]
            seq_lens.append(n + own[b])
            starts.append(n)
            group.append(b)
            b += 1
        for c in range(0, len(group), max_members):
            chunk = group[c:c + max_members]
            members_lists.append(chunk + [-1] * (max_members - len(chunk)))
            lengths.append(n)
            group_rows.append(chunk[0])
    for _ in range(loners):
        table[b, :own[b]] = torch.tensor(perm[at:at + own[b]])
        at += own[b]
        seq_lens.append(own[b])
        starts.append(0)
        b += 1
    pool = KVPool(2, num_slots, kv_heads, dim, dtype, DEVICE)
    for buf in pool.k_buffers + pool.v_buffers:
        buf.copy_(torch.randn(buf.shape, generator=gen))
    t = len(seq_lens)
    loc = torch.tensor([table[i, s - 1].item() for i, s in enumerate(seq_lens)])
    dev = lambda x: torch.tensor(x, device=DEVICE)   # noqa: E731
    shared = SharedPrefixes(dev(members_lists), dev(lengths), dev(group_rows), dev(starts), len(lengths),
                            max_members)
    batch = ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.int64, device=DEVICE), positions=dev([s - 1 for s in seq_lens]),
        out_cache_loc=loc.to(DEVICE), req_rows=dev(list(range(t))), seq_lens=dev(seq_lens),
        extend_lens=dev([1] * t), seq_lens_cpu=seq_lens, extend_lens_cpu=[1] * t, is_decode=True,
        logits_indices=dev(list(range(t))), req_to_token=table.to(DEVICE), shared_prefixes=shared)
    qkv = [torch.randn(t, h, dim, generator=gen).to(DEVICE, dtype) for h in (heads, kv_heads, kv_heads)]
    return pool, batch, qkv


def clone(pool: KVPool) -> KVPool:
    out = KVPool(pool.num_layers, pool.num_slots, pool.num_kv_heads, pool.head_dim, pool.dtype, DEVICE)
    for dst, src in zip(out.k_buffers + out.v_buffers, pool.k_buffers + pool.v_buffers):
        dst.copy_(src)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 64), (16, 2, 128), (8, 8, 64)])
def test_cascade_decode_matches_torch(dtype, heads, kv_heads, dim):
    check_cascade_decode(dtype, heads, kv_heads, dim, [(5, 700), (2, 256), (3, 1500)])


def check_cascade_decode(dtype: torch.dtype, heads: int, kv_heads: int, dim: int,
                         groups: list[tuple[int, int]]) -> None:
    """groups: (members, shared prefix length) of each prefix group."""
    from rlserve.layers.attention.triton_backend import TritonAttentionBackend
    pool, batch, (q, k, v) = shared_case(groups, loners=3, heads=heads, kv_heads=kv_heads, dim=dim,
                                         dtype=dtype, max_members=4)
    ref = TorchAttentionBackend(clone(pool), dim ** -0.5)
    ref.prepare(batch)
    want = ref.forward(q, k, v, 1, batch)
    backend = TritonAttentionBackend(clone(pool), dim ** -0.5, num_heads=heads)
    backend.prepare(batch)
    assert backend._prefix_splits > 0
    got = backend.forward(q, k, v, 1, batch)
    torch.testing.assert_close(got, want, **TOL[dtype])
    # The same batch without the shared-prefix pass agrees too (the plain path is untouched).
    backend.prepare(ForwardBatch(**{**batch.__dict__, "shared_prefixes": None}))
    assert backend._prefix_splits == 0
    torch.testing.assert_close(backend.forward(q, k, v, 1, batch), want, **TOL[dtype])


def test_cascade_decode_over_an_fp8_pool_matches_torch():
    """The shared-prefix pass reads e4m3 values and head-major scales like the decode kernel does."""
    from rlserve.kv_pool import FP8_DTYPE
    from rlserve.layers.attention.triton_backend import TritonAttentionBackend
    pool, batch, (q, k, v) = shared_case([(4, 900), (3, 300)], loners=2, heads=16, kv_heads=8, dim=128,
                                         dtype=torch.bfloat16, max_members=4, seed=2)

    def fp8_pool() -> KVPool:
        out = KVPool(pool.num_layers, pool.num_slots, pool.num_kv_heads, pool.head_dim, FP8_DTYPE, DEVICE)
        every = torch.arange(pool.num_slots, device=DEVICE)
        for layer in range(pool.num_layers):
            out.store(layer, every, pool.k_buffers[layer], pool.v_buffers[layer])
        return out

    ref = TorchAttentionBackend(fp8_pool(), 128 ** -0.5)
    ref.prepare(batch)
    want = ref.forward(q, k, v, 1, batch)
    backend = TritonAttentionBackend(fp8_pool(), 128 ** -0.5, num_heads=16)
    backend.prepare(batch)
    assert backend._prefix_splits > 0
    got = backend.forward(q, k, v, 1, batch)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
