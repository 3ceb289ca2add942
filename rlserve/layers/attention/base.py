"""What the model needs to know about a batch, and the attention-backend interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SharedPrefixes:
    """Decode requests that read the same cached prefix, for cascade attention: group g's members
    (batch indices, -1 padded to max_members) all hold the KV of positions [0, lengths[g]) at the
    same slots, those of req_to_token[rows[g]]. starts[b] is where request b's own part begins (0 for
    a request in no group)."""
    members: torch.Tensor          # [G, max_members]
    lengths: torch.Tensor          # [G]
    rows: torch.Tensor             # [G]
    starts: torch.Tensor           # [B]
    num_groups: int
    max_members: int


@dataclass
class ForwardBatch:
    """A flat batch of new tokens from several sequences (prefill chunks or one decode token each).

    Sequence b owns tokens [cu_extend[b], cu_extend[b+1]) of the flat tensors; its K/V for all
    `seq_lens[b]` tokens (cached prefix + new) are at `req_to_token[req_rows[b], :seq_lens[b]]`.
    """
    input_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T]
    out_cache_loc: torch.Tensor    # [T] KV slots the new tokens' K/V are written to
    req_rows: torch.Tensor         # [B] rows of the request-to-token table
    seq_lens: torch.Tensor         # [B] prefix + new tokens
    extend_lens: torch.Tensor      # [B] new tokens
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    is_decode: bool                # every sequence adds exactly one token
    logits_indices: torch.Tensor   # [L] flat token positions whose logits are wanted
    req_to_token: torch.Tensor     # [rows, max_context] the table itself
    shared_prefixes: SharedPrefixes | None = None   # decode only; backends may ignore it

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    def prepare(self, batch: ForwardBatch) -> None:
        """Build per-batch metadata once, before the layers run."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                batch: ForwardBatch) -> torch.Tensor:
        """Store k/v ([T, KvH, D]) into the pool at batch.out_cache_loc, attend q ([T, H, D]) over each
        sequence's cached + new keys causally, return [T, H * D]."""
