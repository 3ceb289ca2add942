"""Full tensors from an FSDP-sharded model, bucket by bucket, for the engines' weight-update routes.

Every rank holds 1/world of each parameter. Sending weights to an engine needs whole HF tensors, but
gathering the whole model at once would need a full copy of it on every rank; instead the parameters are
gathered (DTensor.full_tensor(), an all-gather) one bucket at a time, in named_parameters() order, and
each bucket is dropped by the consumer before the next is gathered. Names are those of the unsharded
LlamaForCausalLM (fully_shard keeps them; a tied lm_head comes once, as the embedding), which is what
update_weights_from_tensor / _from_distributed expect. Every rank must drain the generator in step:
each parameter's gather is a collective.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from rlserve.weight_sync.group import plan_buckets
from rlserve.weight_sync.tensors import NamedTensors


def _full(p: torch.Tensor) -> torch.Tensor:
    if not isinstance(p, DTensor):
        return p.detach()
    mesh = p.device_mesh
    local = p.to_local()
    if local.device.type != mesh.device_type:
        # CPU-offloaded shards: the collective runs on the mesh's device (NCCL has no CPU tensors).
        p = DTensor.from_local(local.to(mesh.device_type), mesh, p.placements, run_check=False,
                               shape=p.shape, stride=p.stride())
    return p.full_tensor().detach()


def gather_full_tensors_in_buckets(module: nn.Module, bucket_bytes: int,
                                   dtype: torch.dtype | None = None) -> Iterator[NamedTensors]:
    """Yield lists of (HF name, full tensor), each list at most bucket_bytes (a bigger tensor goes
    alone), cast to `dtype` when given (the engine's dtype). Unsharded parameters pass through as they
    are, so the same call serves a model with or without FSDP."""
    named = [(name, p) for name, p in module.named_parameters()]
    sizes = [p.numel() * (dtype or p.dtype).itemsize for _, p in named]
    for bucket in plan_buckets(sizes, bucket_bytes):
        pairs: NamedTensors = []
        for i in bucket:
            name, p = named[i]
            full = _full(p)
            pairs.append((name, full if dtype is None else full.to(dtype)))
        yield pairs
