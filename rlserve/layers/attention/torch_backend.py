"""Reference attention over the KV pool in plain torch: gather each sequence's keys, pad, masked SDPA.

Slow but obviously correct; every faster backend is tested against it. It is also the CPU's backend, and
a decode batch (one query per sequence, at its last position) takes a shorter way there:
- no padding of the queries: they go to SDPA as a view and the output comes back as a reshape, where a
  prefill scatters its queries into a padded [B, E] block and gathers the output back;
- the query heads that share a K/V head are that head's query rows ([B, KvH, H / KvH, D]), so SDPA reads
  each key once per K/V head rather than once per query head (32 sequences of up to 640 keys, one
  thread: 2.3 against 3.4 ms a layer);
- sequences of very different lengths are split into groups of similar length (`length_groups`), each
  gathered and attended with its own padding: gathering and reading the pool is most of the step's
  attention time, and padding every sequence to the longest wastes a third of it for uniformly
  spread lengths;
- a lone sequence whose slots form a few runs of consecutive slots (its cached prefix, then the slots it
  was given in order) reads its keys as slices of the pool instead of gathering them (`_slot_runs`), and
  a group whose keys are all valid (batch 1, equal lengths) goes to SDPA without a mask.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from rlserve.kv_pool import KVPool
from rlserve.layers.attention.base import ForwardBatch

GROUP_MIN = 8            # sequences per decode length group, at least (each group costs a few more ops)
MAX_SLOT_RUNS = 4        # a lone decode sequence reads its K/V as pool slices when its slots form this few runs
GROUP_SAVING = 0.75      # split only where the padded keys fall below this share of one group's


def length_groups(seq_lens: list[int]) -> list[list[int]]:
    """Batch indices in 1, 2 or 4 groups of similar length (sorted, equal counts): the split with the
    fewest padded keys, where it pads at most GROUP_SAVING of what a single group does."""
    b = len(seq_lens)
    order = sorted(range(b), key=seq_lens.__getitem__)
    best, best_cost = [list(range(b))], float(b * max(seq_lens))
    limit = GROUP_SAVING * best_cost
    for n in (2, 4):
        if b < n * GROUP_MIN:
            break
        size = -(-b // n)
        groups = [order[i:i + size] for i in range(0, b, size)]
        cost = sum(len(g) * seq_lens[g[-1]] for g in groups)
        if cost <= limit and cost < best_cost:
            best, best_cost = groups, cost
    return best


class TorchAttentionBackend:
    def __init__(self, pool: KVPool, scale: float) -> None:
        self.pool = pool
        self.scale = scale

    def prepare(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        ext, seq = batch.extend_lens, batch.seq_lens
        max_ext, max_seq = max(batch.extend_lens_cpu), max(batch.seq_lens_cpu)
        b = batch.batch_size
        key_pos = torch.arange(max_seq, device=device)
        self._shape = (b, max_ext)
        self._decode = max_ext == 1 and batch.input_ids.numel() == b
        if self._decode:
            self._prepare_decode(batch, key_pos)
            return
        key_valid = key_pos[None, :] < seq[:, None]                                   # [B, S]
        self._kv_index = torch.where(key_valid, batch.req_to_token[batch.req_rows, :max_seq], 0)
        # Flat token t of sequence b sits at padded row j = t - cu_extend[b].
        cu = torch.zeros(b + 1, dtype=torch.int64, device=device)
        cu[1:] = torch.cumsum(ext, 0)
        self._rows = torch.repeat_interleave(torch.arange(b, device=device), ext)
        self._cols = torch.arange(batch.input_ids.numel(), device=device) - cu[:-1][self._rows]
        q_pos = (seq - ext)[:, None] + torch.arange(max_ext, device=device)[None, :]  # absolute position
        mask = key_valid[:, None, :] & (key_pos[None, None, :] <= q_pos[:, :, None])   # [B, E, S]
        mask[:, :, 0] = True  # padded query rows must see something; their output is discarded
        self._mask = mask[:, None]                                                     # [B, 1, E, S]

    def _prepare_decode(self, batch: ForwardBatch, key_pos: torch.Tensor) -> None:
        """Per length group: its batch indices (None: the whole batch, in order), the pool slots of its
        keys [G, S] (slot 0 past a sequence's end) and which are valid [G, 1, 1, S], None where all are (a
        decode query is its sequence's last position, so it sees every valid key)."""
        groups = length_groups(batch.seq_lens_cpu)
        self._runs = self._slot_runs(batch) if batch.batch_size == 1 else None
        self._groups: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = []
        for members in groups:
            s = max(batch.seq_lens_cpu[i] for i in members)
            idx = None if len(groups) == 1 else torch.tensor(members, device=key_pos.device)
            rows = batch.req_rows if idx is None else batch.req_rows[idx]
            seq = batch.seq_lens if idx is None else batch.seq_lens[idx]
            if all(batch.seq_lens_cpu[i] == s for i in members):
                # Every key is valid (one sequence, or all of one length): no mask, SDPA's unmasked path,
                # and no where() over the slots.
                self._groups.append((idx, batch.req_to_token[rows, :s], None))
                continue
            valid = key_pos[None, :s] < seq[:, None]
            self._groups.append((idx, torch.where(valid, batch.req_to_token[rows, :s], 0), valid[:, None, None, :]))

    def _slot_runs(self, batch: ForwardBatch) -> list[tuple[int, int]] | None:
        """[(first, end)] of pool slots where one sequence's keys sit in at most MAX_SLOT_RUNS runs of
        consecutive slots (a lone request's are: its cached prefix, then the slots it was given in
        order): each layer then reads its K/V as slices of the pool (a view for one run) instead of
        gathering them row by row (the gathers were a tenth of a batch-1 CPU step). CPU only (the runs
        are read on the host), not for an fp8 pool (its loads dequantize)."""
        if self.pool.fp8 or batch.req_to_token.device.type != "cpu":
            return None
        s = batch.seq_lens_cpu[0]
        slots = batch.req_to_token[int(batch.req_rows[0]), :s]
        breaks: list[int] = ((slots[1:] - slots[:-1]) != 1).nonzero().flatten().tolist()
        if len(breaks) >= MAX_SLOT_RUNS:
            return None
        starts, ends = [0] + [i + 1 for i in breaks], [i + 1 for i in breaks] + [s]
        firsts: list[int] = slots[starts].tolist()
        return [(f, f + e - st) for f, st, e in zip(firsts, starts, ends)]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                batch: ForwardBatch) -> torch.Tensor:
        self.pool.store(layer, batch.out_cache_loc, k, v)
        if self._decode:
            return self._decode_forward(q, k.shape[1], layer)
        b, max_ext = self._shape
        heads, dim = q.shape[1], q.shape[2]
        qp = q.new_zeros(b, max_ext, heads, dim)
        qp[self._rows, self._cols] = q
        keys, values = self.pool.load(layer, self._kv_index, q.dtype)     # [B, S, KvH, D]
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=self._mask, scale=self.scale, enable_gqa=True)             # [B, H, E, D]
        return out.transpose(1, 2)[self._rows, self._cols].reshape(-1, heads * dim)

    def _decode_forward(self, q: torch.Tensor, kv_heads: int, layer: int) -> torch.Tensor:
        b, heads, dim = q.shape
        # Query head h reads K/V head h // (heads / kv_heads): a view, also of a strided q.
        grouped = q.view(b, kv_heads, heads // kv_heads, dim)
        out = q.new_empty(b, heads * dim) if len(self._groups) > 1 else None
        for idx, kv_index, mask in self._groups:
            if self._runs is not None:
                keys, values = (_runs_view(buf[layer], self._runs, q.dtype)
                                for buf in (self.pool.k_buffers, self.pool.v_buffers))
            else:
                keys, values = (x.transpose(1, 2) for x in self.pool.load(layer, kv_index, q.dtype))
            o = F.scaled_dot_product_attention(
                grouped if idx is None else grouped.index_select(0, idx), keys, values, attn_mask=mask,
                scale=self.scale)                                                # [G, KvH, H / KvH, D]
            if out is None or idx is None:
                return o.reshape(b, heads * dim)
            out.index_copy_(0, idx, o.reshape(-1, heads * dim))
        assert out is not None
        return out


def _runs_view(buf: torch.Tensor, runs: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    """The slots of `runs` in one layer's buffer [slots, KvH, D] as [1, KvH, S, D]. One run in the
    query's dtype (a batch-1 decode step) is a single strided view of the buffer: one op where a slice,
    an unsqueeze and a transpose were three (each a dispatch, per layer and per K and V)."""
    if len(runs) == 1 and buf.dtype == dtype:
        first, end = runs[0]
        slots, heads, dim = buf.shape
        return buf.as_strided((1, heads, end - first, dim), (0, buf.stride(1), buf.stride(0), buf.stride(2)),
                              buf.storage_offset() + first * buf.stride(0))
    return _as_dtype(_concat([buf[first:end] for first, end in runs]).unsqueeze(0), dtype).transpose(1, 2)


def _as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # .to() of the same dtype returns x, but still costs a dispatch: at batch 1 on a CPU, two a layer
    return x if x.dtype == dtype else x.to(dtype)


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# The padded batch may cost at most this many times the attention work of the sequences alone.
PADDED_WORK_LIMIT = 4


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     cu_seqlens: list[int]) -> torch.Tensor:
    """Plain causal attention over packed sequences without a KV pool (training, reference): q [T, H, D],
    k and v [T, KV heads, D], sequences delimited by cu_seqlens; returns [T, H * D].

    Several sequences run as one batched call, each right-padded to the longest: causal attention never
    lets a real position see the padding after it, and the padded rows are dropped. One launch a layer
    instead of one per sequence (a micro-batch of 16 on a GPU was launch-bound), for some wasted work on
    the padding (attention only; the projections see the packed tokens), bounded by PADDED_WORK_LIMIT."""
    lengths = [e - s for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    longest = max(lengths)
    if len(lengths) == 1 or len(lengths) * longest * longest > PADDED_WORK_LIMIT * sum(n * n for n in lengths):
        # one sequence; or one long one among short ones, where padding would multiply the work: a call each
        outs = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                               v[s:e].transpose(0, 1), is_causal=True, scale=scale,
                                               enable_gqa=True).transpose(0, 1)
                for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        return _concat(outs).reshape(q.shape[0], -1)
    rows = _padded_rows(tuple(lengths), longest, q.device)

    def padded(x: torch.Tensor) -> torch.Tensor:        # [T, heads, D] -> [batch, heads, longest, D]
        out = x.new_zeros(len(lengths) * longest, *x.shape[1:]).index_copy(0, rows, x)
        return out.view(len(lengths), longest, *x.shape[1:]).transpose(1, 2)

    o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True, scale=scale,
                                       enable_gqa=True)
    return o.transpose(1, 2).reshape(len(lengths) * longest, -1).index_select(0, rows)


@functools.lru_cache(maxsize=8)
def _padded_rows(lengths: tuple[int, ...], longest: int, device: torch.device) -> torch.Tensor:
    """Each packed token's row in the padded [sequences * longest] layout (cached: every layer of a forward
    asks for the same one)."""
    return torch.tensor([i * longest + j for i, n in enumerate(lengths) for j in range(n)], device=device)
