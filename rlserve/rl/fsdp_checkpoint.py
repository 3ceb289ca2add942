"""Sharded checkpoints of FSDP-sharded models and their optimizers (torch.distributed.checkpoint).

Each rank writes only its own shards (no rank ever holds the full model or optimizer state), and a
checkpoint loads onto the same or another number of ranks: DCP reshards on load. The state dicts go
through torch.distributed.checkpoint.state_dict, which keys model and optimizer state by parameter
name rather than by position. Like checkpoint.py's, a checkpoint is written into a hidden temporary
directory and renamed into place once every rank has finished, so a crash mid-write leaves no
half-written checkpoint under the final name.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _states(models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """{"model.<key>": model state, "optim.<key>": optimizer state}; an optimizer is paired with the
    model of the same key (its parameters' names come from that model)."""
    state: dict[str, Any] = {}
    for key, model in models.items():
        opt = optimizers.get(key)
        model_sd, optim_sd = get_state_dict(model, [opt] if opt is not None else [])
        state[f"model.{key}"] = model_sd
        if opt is not None:
            state[f"optim.{key}"] = optim_sd
    return state


def save_sharded(path: str | Path, models: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer] | None = None) -> Path:
    """Write every rank's shards of `models` (and of the optimizers under the same keys) to `path`.
    Call on every rank with the same path."""
    path = Path(path)
    tmp = path.parent / f".tmp_{path.name}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_states(models, optimizers or {}), checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()
    return path


def load_sharded(path: str | Path, models: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer] | None = None) -> None:
    """Load a save_sharded checkpoint into already sharded `models` and their `optimizers` in place.
    Optimizers must be built over the sharded parameters first; their state is created here."""
    optimizers = optimizers or {}
    state = _states(models, optimizers)
    dcp.load(state, checkpoint_id=str(path))
    for key, model in models.items():
        opt = optimizers.get(key)
        set_state_dict(model, [opt] if opt is not None else [], model_state_dict=state[f"model.{key}"],
                       optim_state_dict=state.get(f"optim.{key}", {}))
