"""Weight updates and reads by HF parameter name: from tensors, from a checkpoint on disk, and back out.

Every update is all-or-nothing: each (name, tensor) pair is checked first (a known name, the parameter's
shape, a floating-point dtype, which is cast to the parameter's), and only then is anything copied, so a
bad update raises ValueError with the old weights and version still serving. Copies go into the existing
parameters (same addresses: captured CUDA graphs and the stacked q/k/v and gate/up views stay valid).

An update needs an idle engine or a paused one (pause_generation). A request held in place
(mode "in_place") keeps the KV it computed with the old weights and continues with the new ones, as in
SGLang; the prefix-cache entries such requests hold survive the update's cache flush (a warning says
so), and flush_cache() drops them once those requests have finished.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from rlserve.engine.lifecycle import LifecycleHost, ReleasedRunner, released, require_idle
from rlserve.engine.tp_plan import Workers
from rlserve.layers.parallel import Shard, full_shape, local_piece, parameter_shards
from rlserve.models.loader import iter_safetensors, resolve_model
from rlserve.models.quantize import quantized_weights

log = logging.getLogger("rlserve")

Weights = torch.nn.Module | Iterable[tuple[str, torch.Tensor]]


def _params(engine: LifecycleHost) -> dict[str, Any]:
    # Tied embeddings are one parameter under two names: a trainer may send either. A quantized layer's
    # weight is a stand-in (shape, dtype, copy_ that quantizes, detach that dequantizes).
    return {**dict(engine.model.named_parameters(remove_duplicate=False)), **quantized_weights(engine.model)}


def tp_workers(engine: LifecycleHost) -> Workers | None:
    """The worker ranks of a tensor-parallel engine (None at one rank)."""
    runner = engine.runner
    return (runner.runner if isinstance(runner, ReleasedRunner) else runner).tp_workers


def check_updatable(engine: LifecycleHost, operation: str) -> None:
    """Raise unless weights may change now: an idle or paused engine (nothing left on the device) whose
    weights are resident."""
    require_idle(engine, operation, paused_ok=True)
    if "weights" in released(engine):
        raise RuntimeError(f"{operation} needs the weights resident: call resume_memory(['weights']) first")


def validate(engine: LifecycleHost, pairs: list[tuple[str, torch.Tensor]],
             params: dict[str, Any] | None = None, shards: dict[str, Shard] | None = None) -> None:
    """Raise ValueError for the first pair that cannot be copied into the model; nothing is changed.
    `params` and `shards`: the engine's, where the caller has them already."""
    params = _params(engine) if params is None else params
    # under tensor parallelism, updates carry full tensors
    shards = parameter_shards(engine.model) if shards is None else shards
    for name, tensor in pairs:
        if not isinstance(name, str) or name not in params:
            raise ValueError(f"unknown parameter {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name}: dtype {tensor.dtype} is not a floating-point type "
                             f"(the parameter is {params[name].dtype})")
        shape = full_shape(shards, name, params[name].shape)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {shape}")


@torch.no_grad()
def update_weights(engine: LifecycleHost, weights: Weights, weight_version: str | None = None) -> int:
    """Copy new parameters in place (a module with the model's parameter names, or (name, tensor) pairs).

    Needs: an idle or paused engine whose weights are resident (released KV is fine).
    Leaves: the parameters at the same addresses, the prefix cache dropped (its KV was computed with the
    old weights), `weight_version` set when one is given (unchanged otherwise). All-or-nothing: a bad name,
    shape or dtype raises ValueError before anything is copied. Returns how many tensors were updated."""
    check_updatable(engine, "update_weights")
    if weight_version is not None and not isinstance(weight_version, str):
        raise ValueError(f"weight_version must be a string, got {type(weight_version).__name__}")
    pairs = list(weights.named_parameters() if isinstance(weights, torch.nn.Module) else weights)
    # Looked up once a push (walking every module costs milliseconds on a small model's push).
    params, shards = _params(engine), parameter_shards(engine.model)
    validate(engine, pairs, params, shards)
    workers = tp_workers(engine)
    if workers is not None:
        workers.send_weights(pairs)           # each rank keeps its piece
    copy_into([(params[name], local_piece(shards, name, tensor)) for name, tensor in pairs])
    if engine.device.type == "cuda":
        # A producer's buffers (CUDA IPC, shared memory) may be reused once this returns.
        torch.cuda.synchronize(engine.device)
    if not engine.flush_cache():
        log.warning("update_weights: requests held in place keep prefix-cache entries computed with the old "
                    "weights; flush_cache() once they finish")
    if weight_version is not None:
        _set_version(engine, weight_version)
    return len(pairs)


def copy_into(pairs: list[tuple[Any, torch.Tensor]]) -> None:
    """dst.copy_(src) for every pair. Plain parameters whose source has their dtype and device go through
    one torch._foreach_copy_ per (device, dtype): a push of hundreds of tensors is then a few launches
    instead of one per tensor (on a GPU each copy_ costs a launch; ~310 of them on a small model was ~5 ms
    of its push). Anything else (a quantized stand-in, a dtype cast) copies one by one."""
    grouped: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for dst, src in pairs:
        if (isinstance(dst, torch.Tensor) and src.dtype == dst.dtype and src.device == dst.device
                and src.shape == dst.shape):
            dsts, srcs = grouped.setdefault((dst.device, dst.dtype), ([], []))
            dsts.append(dst)
            srcs.append(src)
        else:
            dst.copy_(src)
    for dsts, srcs in grouped.values():
        torch._foreach_copy_(dsts, srcs)


def read_checkpoint(engine: LifecycleHost, model_path: str, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors directory or .gguf file, on the host, checked against the model:
    no tensor missing, none unknown, every shape right. Raises ValueError; changes nothing."""
    fmt = load_format or "auto"
    if fmt not in ("auto", "safetensors", "gguf"):
        raise ValueError(f"load_format must be auto, safetensors or gguf for a weight update; got {fmt!r}")
    try:
        source = resolve_model(model_path, fmt)
    except (FileNotFoundError, OSError) as e:
        raise ValueError(f"cannot load weights from {model_path!r}: {e}") from e
    if source.model_dir is None or source.load_format != "safetensors":
        raise ValueError(f"{model_path!r} has no weights on disk (a preset); pass a checkpoint directory or .gguf file")
    try:
        pairs = [(name, tensor) for name, tensor in iter_safetensors(Path(source.model_dir))
                 if not engine.model.ignores_checkpoint_tensor(name)]
    except (OSError, RuntimeError, SafetensorError) as e:     # a truncated or corrupt file
        raise ValueError(f"cannot read the tensors of {model_path!r}: {e}") from e
    validate(engine, pairs)
    wanted = {n for n, _ in engine.model.named_parameters()}
    missing = sorted(wanted - {n for n, _ in pairs})
    if missing:
        raise ValueError(f"{model_path!r} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    return pairs


def update_weights_from_disk(engine: LifecycleHost, model_path: str, load_format: str | None = None,
                             weight_version: str | None = None) -> int:
    """Load a whole checkpoint into the model (read and checked on the host first, then copied)."""
    check_updatable(engine, "update_weights_from_disk")
    return update_weights(engine, read_checkpoint(engine, model_path, load_format), weight_version)


def get_weights_by_name(engine: LifecycleHost, name: str, truncate_size: int = 100) -> list[object]:
    """The parameter's first `truncate_size` rows (along dim 0) as a nested list of floats, as SGLang
    returns them. Raises ValueError for an unknown name."""
    params = _params(engine)
    if name not in params:
        raise ValueError(f"unknown parameter {name!r}")
    if isinstance(truncate_size, bool) or not isinstance(truncate_size, int) or truncate_size < 0:
        raise ValueError(f"truncate_size must be a non-negative integer, got {truncate_size!r}")
    if "weights" in released(engine):
        raise RuntimeError("the weights are released: call resume_memory(['weights']) first")
    tensor = params[name].detach()
    workers, shards = tp_workers(engine), parameter_shards(engine.model)
    if workers is not None and name in shards:        # a piece on each rank: gather the whole
        tensor = workers.read_weight(name, tensor, shards[name])
    values: list[object] = tensor[:truncate_size].float().cpu().tolist()
    return values


def set_weight_version(engine: LifecycleHost, version: str) -> None:
    """Name the weights being served. Requests already there continue under the new name from their next
    token (a paused or idle engine has taken every token sampled so far; a running one may still take an
    in-flight step's tokens under the new name)."""
    if not isinstance(version, str) or not version:
        raise ValueError(f"the weight version must be a non-empty string, got {version!r}")
    _set_version(engine, version)


def _set_version(engine: LifecycleHost, version: str) -> None:
    """Set the version, and open a span of it in every unfinished request's weight_version_spans: the
    tokens they sample from now on come from these weights (an update waits for a paused or idle engine,
    so every token sampled with the old weights has been taken)."""
    engine.weight_version = version
    for group in engine.groups.values():
        for req in group.reqs:
            if not req.finished:
                req.note_weight_version(version)
