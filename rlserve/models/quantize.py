"""Swap a loaded model's projections (q/k/v/o, gate/up/down) for quantized layers (layers/quantized.py),
and, for the CPU methods (int8, int4), its lm_head too.

The embedding and the norms stay in the model's float dtype. The swap happens from outside the model
definition, after its weights are loaded and cast: each nn.Linear is replaced by its quantized twin.
`stack_projections` then fuses q/k/v and gate/up by concatenating their quantized buffers (one packed
matmul each, as the float model runs one GEMM), and each layer's buffers become views into the fused
storage, so an update of one layer's weight by name (`quantized_weights`) lands in the fused layer too.

lm_head (under int8 and int4; fp8 keeps a float one): an int8 copy computes the logits. On a CPU at batch
1 the float32 lm_head reads as many bytes as all the int4 projections together; int8 rather than int4
because the default model's embedding is not 4-bit in its GGUF (an int4 lm_head moves its logits by 7.5%,
mean KL 0.065 nats, where int8's moves them by 1%, 0.0013 nats) and because the int8 kernel is also the
faster of the two for this shape (1.8 against 2.5 ms at batch 1, one thread). Where it is tied to the embedding (the default
SmolLM2), the embedding keeps its float weight as the lookup table and an update of either name updates
both (`TiedQuantizedWeight`); a read by name returns the float weight. Pooling models keep theirs (no
logits are computed with it).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlserve.config import ModelConfig
from rlserve.layers.quantized import (
    INT4_ROW_BLOCK,
    METHODS,
    QuantizedLinear,
    QuantizedWeight,
    TiedQuantizedWeight,
    check_int4_shape,
    make_quantized,
)
from rlserve.layers.stacked_linear import StackedLinear
from rlserve.models.fp8_checkpoint import auto_quantization, checkpoint_quant_config, keep_fp8_codes, runs_fp8
from rlserve.models.heads import LlamaForPooling
from rlserve.models.llama import LlamaForCausalLM
from rlserve.models.loader import ModelSource, iter_stored_safetensors

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
FUSED = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
# Which dimension of each buffer runs along the output channels (where fused layers are concatenated).
_OUT_DIM = {"qweight": 0, "scales": 0, "packed": 0, "scales_and_zeros": 1, "weight_scale": 1}
LM_HEAD_METHODS = ("int8", "int4")      # fp8's GPU path keeps a float lm_head
LM_HEAD_QUANTIZATION = "int8"           # under either (the module docstring says why)


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each quantized projection."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def fp8_unfit_projection(cfg: ModelConfig) -> tuple[str, tuple[int, int]] | None:
    """The first projection whose sizes the FP8 kernel cannot take (both must be multiples of 16)."""
    return next(((name, (k, n)) for name, (k, n) in projection_shapes(cfg).items() if k % 16 or n % 16), None)


def check_quantization(method: str | None, group_size: int, cfg: ModelConfig, device: torch.device) -> None:
    """Raise ValueError, naming the option, for a combination that cannot run (before any weight loads)."""
    if method is None:
        return
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if method == "fp8":
        if device.type != "cuda":
            raise ValueError("quantization=fp8 needs a CUDA device (FP8 matmuls through torch._scaled_mm); "
                             "on a CPU use quantization=int8 or int4")
        if not runs_fp8(device):
            raise ValueError("quantization=fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+)")
        unfit = fp8_unfit_projection(cfg)
        if unfit is not None:
            name, (k, n) = unfit
            raise ValueError(f"quantization=fp8 needs {name}'s sizes divisible by 16; got {k}x{n}")
    elif device.type != "cpu":
        raise ValueError(f"quantization={method} runs on CPU kernels; on CUDA use quantization=fp8")
    if method == "int4":
        for name, (k, n) in projection_shapes(cfg).items():
            check_int4_shape(k, n, group_size, f" ({name})")


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None


@torch.no_grad()
def quantize_model(model: LlamaForCausalLM, method: str | None, group_size: int = 32) -> None:
    """Replace every projection by its quantized twin (None: leave the model float). Call it once the
    weights are loaded and cast, before `stack_projections` (which then fuses the quantized layers)."""
    if method is None:
        return
    model.unstack_projections()
    for layer in model.decoder_layers():
        for part, names in PROJECTIONS.items():
            owner = getattr(layer, part)
            for name in names:
                linear = getattr(owner, name)
                if type(linear) is not nn.Linear:
                    raise ValueError(f"quantization={method} runs on plain linear layers only (not under "
                                     f"tensor parallelism); {name} is a {type(linear).__name__}")
                setattr(owner, name, make_quantized(method, linear.weight, linear.bias, group_size))
    # Set on this instance only (the model class knows nothing of quantization): is_quantized reads the
    # method; the quantized layers are fused their own way, and releasing memory without the memory saver
    # keeps them resident (only float tensors go to the host), so there is nothing to unstack.
    setattr(model, "quantization", method)  # noqa: B010
    setattr(model, "stack_projections", lambda: stack_quantized(model))  # noqa: B010
    setattr(model, "unstack_projections", lambda: None)  # noqa: B010
    quantize_lm_head(model, method, group_size)


@torch.no_grad()
def quantize_lm_head(model: LlamaForCausalLM, method: str, group_size: int) -> None:
    """Compute the logits with an int8 copy of lm_head (a tied embedding keeps its float weight as the
    lookup table). The kernel writes bfloat16, so the logits carry bfloat16's rounding (8 bits of
    mantissa) on top of the weights' quantization error; they are widened to float32 as fp32_logits asks.
    Pooling models compute no logits and keep theirs."""
    if method not in LM_HEAD_METHODS or isinstance(model, LlamaForPooling) or type(model.lm_head) is not nn.Linear:
        return
    head = make_quantized(LM_HEAD_QUANTIZATION, model.lm_head.weight, model.lm_head.bias, group_size)
    setattr(model, "lm_head", head)  # noqa: B010   (a QuantizedLinear where the class declares nn.Linear)

    def compute_logits(hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        logits = head(hidden)
        return logits.float() if float32 or model.fp32_logits else logits

    setattr(model, "compute_logits", compute_logits)  # noqa: B010


class QuantizedStacked(StackedLinear):
    """StackedLinear's role for quantized layers: one fused quantized matmul, split by columns."""

    def __init__(self, fused: QuantizedLinear, sizes: list[int]) -> None:
        # StackedLinear.__init__ stacks float weights; these are fused already.
        self.fused, self.sizes = fused, sizes

    def intact(self) -> bool:
        return True                       # the layers' buffers are views of the fused ones, never rebound

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.fused(x).split(self.sizes, dim=-1))


def _fusable(layers: list[QuantizedLinear]) -> bool:
    if len({type(l) for l in layers}) != 1 or len({l.bias is None for l in layers}) != 1:
        return False
    # int4's packing interleaves rows in blocks: a layer's rows must start and end on a block.
    return layers[0].method != "int4" or all(l.out_features % INT4_ROW_BLOCK == 0 for l in layers)


@torch.no_grad()
def fuse(layers: list[QuantizedLinear]) -> QuantizedStacked:
    """Concatenate the layers' buffers into one quantized layer and make each layer's buffers views of it."""
    first = layers[0]
    fused = first.__class__.__new__(first.__class__)
    bias = None if first.bias is None else torch.cat([l.bias.detach() for l in layers])  # type: ignore[union-attr]
    QuantizedLinear.__init__(fused, first.in_features, sum(l.out_features for l in layers), bias, first.dtype)
    fused.__dict__.update({k: v for k, v in first.__dict__.items() if k in ("group_size", "unit_scale")})
    for name, _ in first.named_buffers(recurse=False):
        dim = _OUT_DIM[name]
        fused.register_buffer(name, torch.cat([getattr(l, name) for l in layers], dim=dim), persistent=False)
    at = 0
    for layer in layers:
        n = layer.out_features
        for name, _ in first.named_buffers(recurse=False):
            setattr(layer, name, getattr(fused, name).narrow(_OUT_DIM[name], at, n))
        if layer.bias is not None and fused.bias is not None:
            layer.bias.data = fused.bias.data[at:at + n]
        at += n
    return QuantizedStacked(fused, [l.out_features for l in layers])


def stack_quantized(model: LlamaForCausalLM) -> None:
    """Fuse q/k/v and gate/up of a quantized model (a no-op where already fused or not fusable)."""
    for layer in model.decoder_layers():
        for part, names in FUSED.items():
            owner: Any = getattr(layer, part)
            if isinstance(owner.stacked, QuantizedStacked):
                continue
            layers = [getattr(owner, n) for n in names]
            owner.stacked = fuse(layers) if _fusable(layers) else None


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Stand-ins for the quantized layers' float weights, by HF name: updating one quantizes the tensor
    copied in, reading one dequantizes. A quantized lm_head tied to the embedding answers to both names
    with the embedding's float weight (an update reaches both)."""
    out = {f"{name}.weight": QuantizedWeight(m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, QuantizedLinear) and isinstance(model, LlamaForCausalLM) and model.config.tie_word_embeddings:
        tied = TiedQuantizedWeight(model.model.embed_tokens.weight, head)
        out["lm_head.weight"] = out["model.embed_tokens.weight"] = tied
    return out


def engine_quantization(asked: str | None, group_size: int, source: ModelSource, cfg: ModelConfig,
                        device: torch.device, tensor_parallel: bool = False) -> str | None:
    """The method the projections are quantized with, given the checkpoint: `gguf` checks the file and
    runs as int4 in groups of 32 (keep_checkpoint_quantization then writes the file's codes in); an FP8
    checkpoint runs fp8 on a GPU with FP8 tensor cores when nothing was asked; otherwise as asked."""
    if asked == "gguf":
        from rlserve.models.gguf_quant import check_gguf_quantization
        check_gguf_quantization(source.gguf_file, group_size, cfg, device)
        return "int4"
    method = auto_quantization(asked, checkpoint_quant_config(source.hf_config), device, tensor_parallel)
    if asked is None and method == "fp8" and fp8_unfit_projection(cfg) is not None:
        return None                     # sizes the FP8 kernel cannot take: the dequantized float model
    return method


def keep_checkpoint_quantization(model: nn.Module, asked: str | None, source: ModelSource) -> None:
    """Write a quantized checkpoint's own codes and scales over the quantized layers (after
    quantize_model, before the fusing): a GGUF's 4-bit blocks under `gguf`, an FP8 checkpoint's e4m3
    weights under fp8."""
    if source.load_format == "dummy" or source.model_dir is None:
        return
    if asked == "gguf":
        from rlserve.models.gguf_quant import keep_gguf_codes
        assert source.gguf_file is not None, "engine_quantization checked the file"
        keep_gguf_codes(model, source.gguf_file, source.model_config)
        return
    qc = checkpoint_quant_config(source.hf_config)
    if getattr(model, "quantization", None) == "fp8" and qc is not None and qc.get("quant_method") == "fp8":
        keep_fp8_codes(model, iter_stored_safetensors(source.model_dir))
