"""`quantization="gguf"`: keep a GGUF file's own 4-bit codes for the projections instead of dequantizing
them to float and quantizing again.

A Q4_1 block holds 32 weights as w = d * q + m (q in 0..15, d and m float16); a Q4_0 block as
w = d * (q - 8). A Q4_K super-block holds 256 weights as 8 sub-blocks of 32, each
w = (d * sc) * q - dmin * mn with 6-bit sc and mn per sub-block and float16 d and dmin per super-block.
PyTorch's CPU int4 kernel (Int4Linear) computes w = (q - 8) * scale + zero per group of input channels,
so all three map onto it with groups of 32 and the file's codes unchanged once each group's (d, m) is
written out: Q4_1 → scale = d, zero = m + 8 d; Q4_0 → scale = d, zero = 0; Q4_K → the group's d is
d * sc and its m is -dmin * mn. The kernel keeps scale and zero in bfloat16, so a kept weight differs
from the file's by bfloat16's rounding of those two numbers (8 bits of mantissa; float16 has 11), never
by the codes.

Everything else comes from the dequantized checkpoint as without quantization (the embedding, Q8_0 in
the default model's file, and the float32 norms), and the lm_head is an int8 copy as under int4
(models/quantize.py says why). llama.cpp's converter permutes the rows of Llama's q and k weights for its
rotary layout; transformers undoes it when dequantizing, and the same row order is applied to the codes.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlserve.config import ModelConfig
from rlserve.layers.quantized import CPU_ACT_DTYPE, Int4Linear, check_int4_shape

GROUP_SIZE = 32                         # GGUF's block of 32 weights
KEPT_TYPES = ("Q4_0", "Q4_1", "Q4_K")   # the GGUF types the int4 kernel takes as they are
SUPER_BLOCK = 256                       # Q4_K: weights per super-block (8 groups of 32)
# GGUF tensor names (blk.N.<key>.weight) of the projections, and their place in the model.
PROJECTIONS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _reader(path: Path) -> Any:
    import gguf
    return gguf.GGUFReader(str(path))


def _architecture(reader: Any) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        return ""
    return bytes(field.parts[field.data[0]]).decode()


def projection_tensors(reader: Any) -> Iterator[tuple[str, Any]]:
    """(HF weight name, GGUF tensor) for each projection of the file."""
    for tensor in reader.tensors:
        match = _BLOCK.fullmatch(tensor.name)
        if match and match.group(2) in PROJECTIONS:
            yield f"model.layers.{match.group(1)}.{PROJECTIONS[match.group(2)]}.weight", tensor


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Two bytes per entry (last axis) as float16, widened to float32."""
    return torch.from_numpy(raw.copy().view(np.float16)[..., 0].astype(np.float32))


def gguf_affine(tensor: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0/Q4_1/Q4_K tensor's file contents as (codes int32 [out, in] in 0..15, d, m float32
    [out, in / 32]) with w = d * q + m, in the file's row order."""
    kind = tensor.tensor_type.name
    if kind not in KEPT_TYPES:
        raise ValueError(f"{tensor.name} is {kind}; only {', '.join(KEPT_TYPES)} keep their codes")
    out, inp = int(tensor.shape[1]), int(tensor.shape[0])       # GGUF lists dimensions innermost first
    if kind == "Q4_K":
        return _q4_k_affine(np.ascontiguousarray(tensor.data), out, inp)
    head = 4 if kind == "Q4_1" else 2                           # float16 d (and m), then 16 bytes of codes
    blocks = np.ascontiguousarray(tensor.data).reshape(out, inp // GROUP_SIZE, head + GROUP_SIZE // 2)
    d = _f16(blocks[..., 0:2])
    packed = torch.from_numpy(blocks[..., head:].copy()).to(torch.int32)
    # Each byte holds weight j in its low nibble and weight j + 16 in its high one.
    q = torch.cat([packed & 0xF, packed >> 4], dim=-1).reshape(out, inp)
    m = _f16(blocks[..., 2:4]) if kind == "Q4_1" else -8.0 * d
    return q, d, m


def _q4_k_affine(data: np.ndarray, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_K super-block is 144 bytes: float16 d and dmin, 12 bytes packing eight 6-bit scales and
    eight 6-bit mins, then 128 bytes of codes. Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7
    mins 0-3; scales and mins 4-7 take their low 4 bits from bytes 8-11 (scale low nibble, min high
    nibble) and their top 2 bits from the top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    blocks = data.reshape(out, inp // SUPER_BLOCK, 144)
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    packed = torch.from_numpy(blocks[..., 4:16].copy()).to(torch.int32)
    low_sc, low_mn, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat([low_sc & 0x3F, (extra & 0xF) | ((low_sc >> 6) << 4)], dim=-1)
    mn = torch.cat([low_mn & 0x3F, (extra >> 4) | ((low_mn >> 6) << 4)], dim=-1)
    codes = torch.from_numpy(blocks[..., 16:].copy()).to(torch.int32).reshape(out, inp // SUPER_BLOCK, 4, 32)
    # Each 32-byte chunk holds sub-block 2c in its low nibbles and sub-block 2c + 1 in its high ones.
    q = torch.stack([codes & 0xF, codes >> 4], dim=3).reshape(out, inp)
    groups = inp // GROUP_SIZE
    return q, (d[..., None] * sc).reshape(out, groups), (-dmin[..., None] * mn).reshape(out, groups)


def _row_order(hf_name: str, rows: int, arch: str, cfg: ModelConfig) -> torch.Tensor | None:
    """The rows of a file's q/k weight in HF order (llama.cpp permutes them for Llama, as transformers'
    LlamaTensorProcessor undoes); None where the file keeps HF's order."""
    if arch != "llama" or not hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        return None
    heads = cfg.num_heads if hf_name.endswith("q_proj.weight") else cfg.num_kv_heads
    idx = torch.arange(rows).reshape(heads, rows // heads // 2, 2)
    return idx.transpose(1, 2).reshape(rows)


def kept_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int4Linear's buffers for w = d * q + m: the kernel's packing of q and bfloat16 scales-and-zeros
    [in / 32, out, 2] with scale = d, zero = m + 8 d (so (q - 8) * scale + zero = d * q + m)."""
    scales_and_zeros = torch.stack([d, m + 8.0 * d], dim=-1).transpose(0, 1).contiguous().to(CPU_ACT_DTYPE)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1), scales_and_zeros


def read_kept(path: Path, cfg: ModelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(codes, d, m) of every projection of a GGUF file, by HF name, rows in HF order."""
    reader = _reader(path)
    arch = _architecture(reader)
    out = {}
    for name, tensor in projection_tensors(reader):
        q, d, m = gguf_affine(tensor)
        order = _row_order(name, q.shape[0], arch, cfg)
        out[name] = (q, d, m) if order is None else (q[order], d[order], m[order])
    return out


def check_gguf_quantization(gguf_file: Path | None, group_size: int, cfg: ModelConfig,
                            device: torch.device) -> None:
    """Raise ValueError, naming the option, where quantization=gguf cannot keep the file's codes."""
    if gguf_file is None:
        raise ValueError("quantization=gguf keeps a GGUF file's 4-bit codes; the model is not a .gguf file "
                         "(pass one, or use quantization=int4 to quantize float weights)")
    if device.type != "cpu":
        raise ValueError("quantization=gguf runs on the CPU int4 kernel; on CUDA use quantization=fp8")
    if group_size != GROUP_SIZE:
        raise ValueError(f"quantization=gguf takes the file's blocks of {GROUP_SIZE} weights; "
                         f"quantization_group_size must be {GROUP_SIZE}, got {group_size}")
    reader = _reader(ensure_gguf(gguf_file))
    found = 0
    for name, tensor in projection_tensors(reader):
        kind = tensor.tensor_type.name
        if kind not in KEPT_TYPES:
            raise ValueError(f"quantization=gguf keeps {', '.join(KEPT_TYPES)} projections only; "
                             f"{tensor.name} ({name}) is {kind}. Use quantization=int4 or int8 (quantize "
                             f"the dequantized weights) or no quantization")
        check_int4_shape(int(tensor.shape[0]), int(tensor.shape[1]), GROUP_SIZE, f" ({name})")
        found += 1
    expected = len(PROJECTIONS) * cfg.num_layers
    if found != expected:
        raise ValueError(f"quantization=gguf: {gguf_file} holds {found} projection tensors where the model "
                         f"has {expected}")


def ensure_gguf(path: Path) -> Path:
    """The default model's GGUF is fetched again where only its converted directory is left."""
    from rlserve.models.default import DEFAULT_GGUF_NAME, _default_gguf, cache_dir

    if not path.is_file() and path == cache_dir() / "gguf" / DEFAULT_GGUF_NAME:
        return _default_gguf()
    return path


@torch.no_grad()
def keep_gguf_codes(model: nn.Module, gguf_file: Path, cfg: ModelConfig) -> int:
    """Overwrite each int4 projection's buffers with the file's codes and scales (before the q/k/v and
    gate/up fusing). Returns how many layers were written."""
    kept = read_kept(ensure_gguf(gguf_file), cfg)
    written = 0
    for name, module in model.named_modules():
        weight = f"{name}.weight"
        if isinstance(module, Int4Linear) and weight in kept:
            if module.group_size != GROUP_SIZE:
                raise ValueError(f"{name}: int4 groups of {module.group_size}, the file's are {GROUP_SIZE}")
            packed, scales_and_zeros = kept_int4(*kept[weight])
            module.packed.copy_(packed)
            module.scales_and_zeros.copy_(scales_and_zeros)
            written += 1
    if written != len(kept):
        raise ValueError(f"quantization=gguf: {len(kept)} projections in the file, {written} int4 layers written")
    return written
