"""Reference attention over the KV pool in plain torch: gather each sequence's keys, pad, masked SDPA.

Slow but obviously correct; every faster backend is tested against it. It is also the CPU's backend, so a
decode batch (one query per sequence) skips the padding: the queries are already one row per sequence,
so they go to SDPA as a view and its output comes back as a reshape, where a prefill scatters its
queries into a padded [B, E] block and gathers the output back (an index_put_ and an index per layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlserve.kv_pool import KVPool
from rlserve.layers.attention.base import ForwardBatch


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
        key_valid = key_pos[None, :] < seq[:, None]                                   # [B, S]
        self._kv_index = torch.where(key_valid, batch.req_to_token[batch.req_rows, :max_seq], 0)
        self._shape = (b, max_ext)
        self._decode = max_ext == 1 and batch.input_ids.numel() == b
        if self._decode:       # the query is each sequence's last position: it sees every valid key
            self._mask = key_valid[:, None, None, :]                                   # [B, 1, 1, S]
            return
        # Flat token t of sequence b sits at padded row j = t - cu_extend[b].
        cu = torch.zeros(b + 1, dtype=torch.int64, device=device)
        cu[1:] = torch.cumsum(ext, 0)
        self._rows = torch.repeat_interleave(torch.arange(b, device=device), ext)
        self._cols = torch.arange(batch.input_ids.numel(), device=device) - cu[:-1][self._rows]
        q_pos = (seq - ext)[:, None] + torch.arange(max_ext, device=device)[None, :]  # absolute position
        mask = key_valid[:, None, :] & (key_pos[None, None, :] <= q_pos[:, :, None])   # [B, E, S]
        mask[:, :, 0] = True  # padded query rows must see something; their output is discarded
        self._mask = mask[:, None]                                                     # [B, 1, E, S]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                batch: ForwardBatch) -> torch.Tensor:
        self.pool.store(layer, batch.out_cache_loc, k, v)
        b, max_ext = self._shape
        heads, dim = q.shape[1], q.shape[2]
        if self._decode:
            qp = q.unsqueeze(1)                                            # [B, 1, H, D], a view
        else:
            qp = q.new_zeros(b, max_ext, heads, dim)
            qp[self._rows, self._cols] = q
        keys, values = self.pool.load(layer, self._kv_index, q.dtype)     # [B, S, KvH, D]
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=self._mask, scale=self.scale, enable_gqa=True)             # [B, H, E, D]
        if self._decode:
            return out.transpose(1, 2).reshape(b, heads * dim)
        return out.transpose(1, 2)[self._rows, self._cols].reshape(-1, heads * dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     cu_seqlens: list[int]) -> torch.Tensor:
    """Plain causal attention over packed sequences without a KV pool (training, reference)."""
    outs = []
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                           v[s:e].transpose(0, 1), is_causal=True, scale=scale,
                                           enable_gqa=True)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs).reshape(q.shape[0], -1)
