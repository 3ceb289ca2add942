"""Sharding the trainer's models with FSDP2 (torch.distributed.fsdp.fully_shard) over the trainer's ranks.

Each decoder layer becomes one FSDP unit (its parameters all-gathered just before it runs and freed
after), then the root takes what is left (embedding, final norm, lm_head, a value head). Parameter
names do not change, so optimizers, checkpoints and weight sync see the same HF names as an unsharded
model. The same code runs on gloo (CPU) and NCCL (CUDA); see fsdp_sync.py for gathering full tensors
to send to the engines and fsdp_checkpoint.py for sharded checkpoints.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from rlserve.models.llama import DecoderLayer, LlamaForCausalLM


def init_trainer_mesh(backend: str | None = None) -> DeviceMesh:
    """A 1-D mesh over every rank of the default process group (created from the torchrun-style
    environment when not yet initialised): NCCL with CUDA, gloo without."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device_type == "cuda" else "gloo"))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard_policy(module: nn.Module, mesh: DeviceMesh, mixed_precision: bool = False, cpu_offload: bool = False,
                 param_dtype: torch.dtype = torch.bfloat16, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard every DecoderLayer inside `module` (a LlamaForCausalLM, a ValueModel or a frozen
    reference), then `module` itself, in place; returns it.

    mixed_precision: layers compute in `param_dtype` while the sharded parameters, gradients and the
    optimizer state stay in the parameters' own dtype (keep them float32) and gradients are reduced in
    float32. cpu_offload: sharded parameters, gradients and optimizer state live on the CPU; each unit is
    copied to the device only while it runs (the optimizer step then runs on the CPU)."""
    for m in module.modules():
        if isinstance(m, LlamaForCausalLM):
            # Stacked q/k/v and gate/up hold the weights' storage in views fully_shard would orphan;
            # training runs the projections one by one anyway.
            m.unstack_projections()
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    layers = [m for m in module.modules() if isinstance(m, DecoderLayer)]
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no decoder layer to shard")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(module, **kwargs)
    # The trainer calls compute_logits outside forward(); FSDP must see it as a forward to have the
    # root's parameters (lm_head or the tied embedding) gathered and its gradients reduced.
    if isinstance(module, LlamaForCausalLM):
        register_fsdp_forward_method(module, "compute_logits")
    return module


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def clip_grad_norm(module: nn.Module, max_norm: float) -> float:
    """Clip gradients to a total L2 norm of max_norm (0: only measure it) across all ranks' shards;
    returns the norm before clipping, the same on every rank and equal to the unsharded model's."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()       # a partial sum of squares on each rank until reduced
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
