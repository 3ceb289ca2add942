"""FP8 checkpoints in HF's layout: config.json's `quantization_config` {"quant_method": "fp8", ...} and
float8 e4m3 linear weights, each with its scale beside it:
- `<layer>.weight_scale`: one scale per tensor ([] or [1]) or per output channel ([out] or [out, 1]);
- `<layer>.weight_scale_inv` with `weight_block_size` [bo, bi] in the config: one scale per block of
  bo × bi weights ([ceil(out / bo), ceil(in / bi)]), as DeepSeek-V3 and Qwen3-FP8 publish. Despite the
  name it multiplies too: w = q * weight_scale_inv.
Static activation scales (`input_scale`, activation_scheme "static") are dropped: the FP8 layers
quantize activations per token at run time.

Reading such a directory (`iter_safetensors`) yields each weight dequantized to float32, so every
engine that does not run FP8 (CPU, a GPU without FP8 tensor cores, tensor parallelism, another
quantization) gets the float model. Under `quantization=fp8` (asked for, or chosen on CUDA from the
config) the FP8 layers then take the stored codes and scales (`keep_fp8_codes`); block-wise scales have
no place in the per-channel kernel, so those layers keep their per-channel quantization of the
dequantized weight.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from rlserve.layers.quantized import FP8_DTYPE, Fp8Linear

logger = logging.getLogger(__name__)

QUANT_METHODS = ("fp8",)                 # checkpoint formats read here
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
_DROPPED_SUFFIXES = (".input_scale", ".activation_scale")


def checkpoint_quant_config(hf_config: Any) -> dict[str, Any] | None:
    """The checkpoint's `quantization_config` as a dict (None: float weights)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    return dict(qc) if isinstance(qc, dict) else dict(qc.to_dict())


def check_checkpoint_quantization(qc: dict[str, Any] | None, name: str) -> None:
    """Raise ValueError for a quantized checkpoint this loader cannot read (before any weight is read)."""
    if qc is None:
        return
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(f"model {name!r}: checkpoint quantization {method!r} (config.json quantization_config) "
                         f"is not supported; rlserve reads {', '.join(QUANT_METHODS)} checkpoints and float ones")
    block = qc.get("weight_block_size")
    if block is not None and (len(block) != 2 or any(int(b) < 1 for b in block)):
        raise ValueError(f"model {name!r}: weight_block_size must be two positive sizes; got {block!r}")
    fmt = qc.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise ValueError(f"model {name!r}: fp8 format {fmt!r} is not supported (e4m3 or e5m2)")


def expand_scale(scale: torch.Tensor, shape: torch.Size, block: list[int] | None) -> torch.Tensor:
    """The float32 scale of every weight of a [out, in] tensor: per tensor, per output channel, or per
    block of `block` = [bo, bi]."""
    out, inp = shape
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(out, inp)
    if s.dim() == 2 and s.shape[1] > 1 or block is not None and s.numel() != out:
        if block is None:
            raise ValueError(f"a block-wise scale {tuple(s.shape)} needs weight_block_size in the config")
        bo, bi = block
        rows, cols = -(-out // bo), -(-inp // bi)
        if tuple(s.shape) != (rows, cols):
            raise ValueError(f"block scale {tuple(s.shape)} does not fit a {out}x{inp} weight in blocks of {bo}x{bi}")
        return s.repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    if s.numel() != out:
        raise ValueError(f"scale {tuple(s.shape)} is neither per tensor nor per channel of a {out}x{inp} weight")
    return s.reshape(out, 1).expand(out, inp)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    """float32 weight = codes * scale."""
    return weight.float() * expand_scale(scale, weight.shape, block)


def dequantize_stream(pairs: Iterable[tuple[str, torch.Tensor]], qc: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield a checkpoint's tensors with each FP8 weight dequantized to float32 and the scales dropped.
    A weight and its scale may come in either order (or different files): whichever comes first waits."""
    block = qc.get("weight_block_size")
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in pairs:
        if name.endswith(_DROPPED_SUFFIXES):
            continue
        scale_of = next((name[: -len(s)] for s in _SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_of is not None:
            key = scale_of + ".weight"
            if key in weights:
                yield key, dequantize_fp8(weights.pop(key), tensor, block)
            else:
                scales[key] = tensor
        elif tensor.dtype in FP8_DTYPES:
            if name in scales:
                yield name, dequantize_fp8(tensor, scales.pop(name), block)
            else:
                weights[name] = tensor
        else:
            yield name, tensor
    if weights or scales:
        lone = sorted(weights) or sorted(scales)
        raise ValueError(f"FP8 checkpoint: {len(weights)} float8 weights without a scale and {len(scales)} "
                         f"scales without a weight, e.g. {lone[:3]}")


def runs_fp8(device: torch.device) -> bool:
    """Whether this device has FP8 tensor cores (compute capability 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def auto_quantization(asked: str | None, qc: dict[str, Any] | None, device: torch.device,
                      tensor_parallel: bool) -> str | None:
    """The quantization an engine runs: what was asked for; for an FP8 checkpoint on a GPU that runs FP8
    at one rank, fp8 when nothing was asked (elsewhere its weights are dequantized at load)."""
    if asked is None and qc is not None and qc.get("quant_method") == "fp8" and not tensor_parallel \
            and runs_fp8(device):
        return "fp8"
    return asked


def stored_fp8(pairs: Iterable[tuple[str, torch.Tensor]], wanted: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The stored codes and scales of the `wanted` weights: {weight name: {"weight", "scale"[, "block"]}}."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in pairs:
        for suffix in (".weight", *_SCALE_SUFFIXES):
            key = name[: -len(suffix)] + ".weight"
            if name.endswith(suffix) and key in wanted:
                part = "weight" if suffix == ".weight" else "scale"
                found.setdefault(key, {})[part] = tensor
                if suffix == ".weight_scale_inv":
                    found[key]["block"] = tensor
                break
    return found


@torch.no_grad()
def keep_fp8_codes(model: nn.Module, pairs: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Write each FP8 projection's stored e4m3 codes and per-channel scales into its Fp8Linear (before the
    q/k/v and gate/up fusing). A per-tensor scale becomes the same scale on every channel. Layers with
    block-wise scales, or stored in another float8 format, keep the per-channel quantization of their
    dequantized weight. Returns how many layers took the stored codes."""
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    kept = requantized = 0
    for key, parts in stored_fp8(pairs, set(layers)).items():
        layer, codes = layers[key], parts.get("weight")
        if codes is None or codes.dtype != FP8_DTYPE or "scale" not in parts:
            continue
        scale = parts["scale"].float()
        if "block" in parts and scale.numel() > 1:
            requantized += 1
            continue
        per_channel = scale.reshape(-1).expand(layer.out_features) if scale.numel() == 1 else scale.reshape(-1)
        layer.qweight.copy_(codes.to(layer.qweight.device))
        layer.weight_scale.copy_(per_channel.reshape(1, -1).to(layer.weight_scale.device))
        kept += 1
    if requantized:
        logger.info("fp8 checkpoint: %d layers with block-wise scales are quantized per channel from their "
                    "dequantized weights (the FP8 kernel takes one scale per output channel)", requantized)
    return kept
