"""The torch attention backend against plain per-sequence attention: a decode batch (its unpadded path)
and a prefill batch with cached prefixes (the padded one), over a pool whose slots are scattered."""
from __future__ import annotations

import pytest
import torch

from rlserve.kv_pool import KVPool
from rlserve.layers.attention.base import ForwardBatch
from rlserve.layers.attention.torch_backend import GROUP_MIN, TorchAttentionBackend, length_groups

HEADS, KV_HEADS, DIM = 6, 2, 16


def make_case(prefix_lens: list[int], extend_lens: list[int], seed: int = 0):
    """Each sequence holds prefix_lens[b] cached tokens and adds extend_lens[b] new ones, at random slots."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    num_slots = sum(seq_lens) + 8
    perm = (torch.randperm(num_slots - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(seq_lens) + 1, max(seq_lens) + 3, dtype=torch.int64)
    at, loc = 0, []
    for b, (s, e) in enumerate(zip(seq_lens, extend_lens)):
        table[b + 1, :s] = torch.tensor(perm[at:at + s])        # rows 1.. (row 0 unused, as in the engine)
        loc += perm[at + s - e:at + s]
        at += s
    pool = KVPool(1, num_slots, KV_HEADS, DIM, torch.float32, "cpu")
    for buf in pool.k_buffers + pool.v_buffers:
        buf.copy_(torch.randn(buf.shape, generator=gen))
    t = sum(extend_lens)
    positions = [p + j for p, e in zip(prefix_lens, extend_lens) for j in range(e)]
    batch = ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.int64), positions=torch.tensor(positions),
        out_cache_loc=torch.tensor(loc), req_rows=torch.arange(1, len(seq_lens) + 1),
        seq_lens=torch.tensor(seq_lens), extend_lens=torch.tensor(extend_lens), seq_lens_cpu=seq_lens,
        extend_lens_cpu=extend_lens, is_decode=all(e == 1 for e in extend_lens),
        logits_indices=torch.arange(t), req_to_token=table)
    q, k, v = (torch.randn(t, h, DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
    return pool, batch, table, (q, k, v)


def reference(pool: KVPool, batch: ForwardBatch, table: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out per sequence and query, after storing the new K/V."""
    keys, values = pool.k_buffers[0].clone(), pool.v_buffers[0].clone()
    keys[batch.out_cache_loc], values[batch.out_cache_loc] = k, v
    out, t = [], 0
    for b, (s, e) in enumerate(zip(batch.seq_lens_cpu, batch.extend_lens_cpu)):
        slots = table[b + 1, :s]
        kk = keys[slots].repeat_interleave(HEADS // KV_HEADS, dim=1)            # [S, H, D]
        vv = values[slots].repeat_interleave(HEADS // KV_HEADS, dim=1)
        for j in range(e):
            visible = s - e + j + 1                                           # causal: itself and before
            scores = torch.einsum("hd,shd->hs", q[t], kk[:visible]) * DIM ** -0.5
            out.append(torch.einsum("hs,shd->hd", scores.softmax(-1), vv[:visible]).reshape(-1))
            t += 1
    return torch.stack(out)


@pytest.mark.parametrize("prefix_lens,extend_lens", [
    ([5, 0, 17, 3], [1, 1, 1, 1]),              # decode (one sequence had no cached token)
    ([0, 9, 4], [7, 1, 12]),                   # prefill chunks beside a decode row
])
def test_torch_backend_matches_per_sequence_attention(prefix_lens, extend_lens):
    pool, batch, table, (q, k, v) = make_case(prefix_lens, extend_lens)
    expected = reference(pool, batch, table, q, k, v)
    backend = TorchAttentionBackend(pool, DIM ** -0.5)
    backend.prepare(batch)
    out = backend.forward(q, k, v, 0, batch)
    assert out.shape == (sum(extend_lens), HEADS * DIM)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.k_buffers[0][batch.out_cache_loc], k)      # the new K/V were stored


def test_length_groups_split_only_where_padding_is_saved():
    assert length_groups([50] * 40) == [list(range(40))]                   # equal lengths: one group
    assert length_groups([10, 600] * (GROUP_MIN - 1)) == [list(range(2 * GROUP_MIN - 2))]   # too few
    spread = [(i * 37) % 640 + 1 for i in range(32)]
    groups = length_groups(spread)
    assert len(groups) > 1 and sorted(i for g in groups for i in g) == list(range(32))
    assert max(spread[i] for i in groups[0]) <= min(spread[i] for i in groups[-1])


def test_decode_in_length_groups_matches_per_sequence_attention():
    prefix = [(i * 37) % 90 for i in range(4 * GROUP_MIN)]
    assert len(length_groups([p + 1 for p in prefix])) == 4
    pool, batch, table, (q, k, v) = make_case(prefix, [1] * len(prefix), seed=2)
    expected = reference(pool, batch, table, q, k, v)
    backend = TorchAttentionBackend(pool, DIM ** -0.5)
    backend.prepare(batch)
    torch.testing.assert_close(backend.forward(q, k, v, 0, batch), expected, atol=1e-5, rtol=1e-5)


def test_decode_accepts_strided_queries():
    """The model's q is a column slice of the fused q/k/v output: the decode path takes it as a view."""
    pool, batch, table, (q, k, v) = make_case([4, 8], [1, 1], seed=1)
    expected = reference(pool, batch, table, q, k, v)
    wide = torch.cat([q.reshape(2, -1), torch.randn(2, 5)], dim=1)
    strided = wide[:, :HEADS * DIM].view(2, HEADS, DIM)
    backend = TorchAttentionBackend(pool, DIM ** -0.5)
    backend.prepare(batch)
    torch.testing.assert_close(backend.forward(strided, k, v, 0, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[3, 1, 7, 5], [30, 1, 2, 1, 1]])
def test_packed_causal_attention_equals_each_sequence_alone_with_gradients(lengths):
    """Training attention runs packed sequences as one padded batch (or, where padding would multiply the
    work, one call each: the second case): each sequence's outputs and the gradients reaching q, k and v
    equal that sequence attended alone (grouped KV heads, a one-token sequence, the longest not first)."""
    from rlserve.layers.attention import torch_backend
    from rlserve.layers.attention.torch_backend import causal_attention

    padded = len(lengths) * max(lengths) ** 2 <= torch_backend.PADDED_WORK_LIMIT * sum(n * n for n in lengths)
    assert padded == (lengths[0] == 3)
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(cu[-1], h, dim, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    out = causal_attention(q, k, v, 0.3, cu)
    assert out.shape == (cu[-1], heads * dim)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    for s, e in zip(cu[:-1], cu[1:]):
        q1, k1, v1 = (x[s:e].detach().clone().requires_grad_() for x in (q, k, v))
        alone = causal_attention(q1, k1, v1, 0.3, [0, e - s])
        torch.testing.assert_close(out[s:e], alone, rtol=1e-5, atol=1e-6)
        for g, g1 in zip(grads, torch.autograd.grad((alone * weights[s:e]).sum(), (q1, k1, v1))):
            torch.testing.assert_close(g[s:e], g1, rtol=1e-5, atol=1e-6)
