"""Tensor-parallel layers: each rank holds a slice of a layer's weight and runs its share of the product.

Megatron's split of a decoder layer: q/k/v and gate/up are column-parallel (each rank computes some heads
or some of the intermediate features, no communication), o_proj and down_proj are row-parallel (each rank
multiplies its slice of the input features; one all-reduce sums the partial products), the embedding and
lm_head are split along the vocabulary (the embedding's rows a rank lacks read as zeros, summed by an
all-reduce; the logits are gathered). K/V heads are split like the query heads; with fewer K/V heads than
ranks, each K/V head is held by the ranks whose query heads read it.

Each sliced Parameter has a `Shard` saying which piece of the full (checkpoint) tensor it holds, so
loading and weight updates take full HF tensors and each rank keeps its piece. With one rank the
factories return the plain nn.Linear / nn.Embedding: nothing here runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rlserve.distributed.group import TPGroup


@dataclass(frozen=True)
class Shard:
    """Piece `index` of `count` equal pieces along `dim` of a full tensor whose length there is `full`
    (zero-padded to `padded` first: a vocabulary that the ranks don't divide)."""
    dim: int
    index: int
    count: int
    full: int
    padded: int

    @property
    def size(self) -> int:
        return self.padded // self.count

    def take(self, full: torch.Tensor) -> torch.Tensor:
        if full.shape[self.dim] != self.full:
            raise ValueError(f"expected length {self.full} along dim {self.dim}, got {tuple(full.shape)}")
        if self.padded != self.full:
            pad = list(full.shape)
            pad[self.dim] = self.padded - self.full
            full = torch.cat([full, full.new_zeros(pad)], self.dim)
        return full.narrow(self.dim, self.index * self.size, self.size)

    def full_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        out[self.dim] = self.full
        return tuple(out)


def even_shard(tp: TPGroup, full: int, dim: int, what: str) -> Shard:
    if full % tp.size:
        raise ValueError(f"{what} ({full}) is not divisible by the tensor-parallel size {tp.size}")
    return Shard(dim, tp.rank, tp.size, full, full)


def head_shard(tp: TPGroup, num_heads: int, head_dim: int, dim: int, what: str) -> Shard:
    """The rank's heads along `dim`; fewer heads than ranks: each head is replicated on tp.size / heads
    neighbouring ranks (those whose query heads it serves)."""
    if num_heads >= tp.size:
        if num_heads % tp.size:
            raise ValueError(f"{what}: {num_heads} heads are not divisible by the tensor-parallel size {tp.size}")
        return Shard(dim, tp.rank, tp.size, num_heads * head_dim, num_heads * head_dim)
    if tp.size % num_heads:
        raise ValueError(f"{what}: the tensor-parallel size {tp.size} is not a multiple of its {num_heads} heads")
    return Shard(dim, tp.rank // (tp.size // num_heads), num_heads, num_heads * head_dim, num_heads * head_dim)


def vocab_shard(tp: TPGroup, vocab_size: int) -> Shard:
    per_rank = -(-vocab_size // tp.size)
    return Shard(0, tp.rank, tp.size, vocab_size, per_rank * tp.size)


class ColumnParallelLinear(nn.Linear):
    """Output features split across ranks; the output stays split (the next layer reads its own part)."""

    def __init__(self, in_features: int, shard: Shard, bias: bool) -> None:
        super().__init__(in_features, shard.size, bias=bias)
        self.shards = {"weight": shard, "bias": shard} if bias else {"weight": shard}


class RowParallelLinear(nn.Linear):
    """Input features split across ranks; one all-reduce sums the partial products (the bias, whole on
    every rank, is added once after it)."""

    def __init__(self, shard: Shard, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__(shard.size, out_features, bias=bias)
        self.shards = {"weight": Shard(1, shard.index, shard.count, shard.full, shard.padded)}
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows of the vocabulary split across ranks: a token outside the rank's rows reads zeros, and an
    all-reduce adds the one rank's row that holds it."""

    def __init__(self, shard: Shard, embedding_dim: int, tp: TPGroup) -> None:
        super().__init__(shard.size, embedding_dim)
        self.shards = {"weight": shard}
        self.start = shard.index * shard.size
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))


class ParallelLMHead(nn.Linear):
    """The lm_head's vocabulary rows split like the embedding's (so a tied one shares its slice);
    `gather_logits` assembles the whole vocabulary."""

    def __init__(self, shard: Shard, hidden_size: int, tp: TPGroup) -> None:
        super().__init__(hidden_size, shard.size, bias=False)
        self.shards = {"weight": shard}
        self.tp = tp
        self.vocab_size = shard.full

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last(local)[..., :self.vocab_size]


# ---- factories: the plain module at one rank ----
def column_linear(tp: TPGroup | None, in_features: int, out_features: int, bias: bool,
                  shard: Shard | None = None) -> nn.Linear:
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return ColumnParallelLinear(in_features, shard or even_shard(tp, out_features, 0, "output features"), bias)


def row_linear(tp: TPGroup | None, in_features: int, out_features: int, bias: bool,
               shard: Shard | None = None) -> nn.Linear:
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(shard or even_shard(tp, in_features, 1, "input features"), out_features, bias, tp)


def embedding(tp: TPGroup | None, vocab_size: int, hidden_size: int) -> nn.Embedding:
    if tp is None:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_shard(tp, vocab_size), hidden_size, tp)


def lm_head(tp: TPGroup | None, hidden_size: int, vocab_size: int) -> nn.Linear:
    if tp is None:
        return nn.Linear(hidden_size, vocab_size, bias=False)
    return ParallelLMHead(vocab_shard(tp, vocab_size), hidden_size, tp)


def parameter_shards(model: nn.Module) -> dict[str, Shard]:
    """Every sliced parameter's Shard by its name (tied names included); empty at one rank."""
    out: dict[str, Shard] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for pname, shard in getattr(module, "shards", {}).items():
            out[f"{prefix}.{pname}" if prefix else pname] = shard
    return out


def full_shape(shards: dict[str, Shard], name: str, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape of parameter `name` whose local shape is `shape`."""
    shard = shards.get(name)
    return tuple(shape) if shard is None else shard.full_shape(shape)


def local_piece(shards: dict[str, Shard], name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the full tensor `name` (the tensor itself where nothing is sliced)."""
    shard = shards.get(name)
    return tensor if shard is None else shard.take(tensor)
