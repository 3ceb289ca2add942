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
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from rlserve.rl.weight_push import alongside
from rlserve.weight_sync.group import plan_buckets
from rlserve.weight_sync.tensors import NamedTensors, dtype_name

if TYPE_CHECKING:
    from rlserve.client import Client
    from rlserve.rl.remote import RemoteRollout


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



def push_sharded(remote: RemoteRollout | None, model: nn.Module, version: int, dtype: torch.dtype) -> None:
    """Server mode with a sharded policy: every rank calls this together (the gathers are collectives);
    rank 0, which holds `remote`, sends each gathered bucket to the servers as RemoteRollout.push_weights
    does (pause, [offload: resume weights], update, [resume KV cache and graphs], continue), through
    update_weights_from_tensor (the version comes with the last bucket) or the run's weight-update
    group (one announcement of every tensor, then one flattened broadcast per gathered bucket: the same
    buckets the servers cut from the announcement). No rank holds more than one bucket at a time."""
    budget = [remote.bucket_bytes if remote is not None else 0]
    dist.broadcast_object_list(budget, src=0)          # the other ranks cut the buckets rank 0 sends
    buckets = gather_full_tensors_in_buckets(model, budget[0], dtype)
    if remote is None:
        for _ in buckets:
            pass
        return
    named = list(model.named_parameters())
    count = len(plan_buckets([p.numel() * dtype.itemsize for _, p in named], budget[0]))
    each = remote._each
    each(lambda c: c.pause_generation("in_place"))
    try:
        if remote.offload:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()     # what the update freed goes back to the GPU first
            each(lambda c: c.resume_memory_occupation(["weights"]))
        if remote.distributed is not None:
            sender = remote.distributed.sender
            meta: dict[str, Any] = {"names": [n for n, _ in named], "dtypes": [dtype_name(dtype)] * len(named),
                    "shapes": [list(p.shape) for _, p in named], "group_name": sender.group_name,
                    "load_format": "flattened_bucket", "bucket_bytes": budget[0]}

            def broadcast() -> None:
                for bucket in buckets:
                    sender.broadcast(bucket, bucket_bytes=None)     # one gathered bucket, one buffer
            alongside([partial(c.announce_distributed_update, weight_version=str(version), **meta)
                       for c in remote.clients], broadcast)
        else:
            update = each if remote.router is None else remote._update
            for i, bucket in enumerate(buckets):
                tag = str(version) if i == count - 1 else None
                update(partial(_send_tensors, pairs=bucket, version=tag))
        if remote.offload:
            each(lambda c: c.resume_memory_occupation(["kv_cache", "cuda_graph"]))
    finally:
        if remote.router is not None:
            remote.router.continue_generation()
        else:
            each(lambda c: c.continue_generation())


def _send_tensors(client: Client, pairs: NamedTensors, version: str | None) -> None:
    client.update_weights_from_tensor(pairs, weight_version=version, bucket_bytes=None)
