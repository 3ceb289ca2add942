"""Linear layers with quantized weights, run through PyTorch's packed matmul kernels.

- int8 (CPU): weight-only, one symmetric scale per output channel; `aten._weight_int8pack_mm`.
- int4 (CPU): weight-only, asymmetric per group of `group_size` input channels (torchao's tinygemm
  scales-and-zeros layout, computed by torchao); `aten._weight_int4pack_mm_for_cpu`.
- fp8 (CUDA): e4m3 weights with one scale per output channel, activations quantized per token at
  run time; `torch._scaled_mm` with row-wise scales.

The CPU kernels take their fast paths with bfloat16 activations (on an AVX-512 CPU they ran 4-10x
faster than with float32 ones), so a float32 model's activations are rounded to bfloat16 at each
quantized layer's input and its output is widened back. Every layer has a slow reference in plain torch
(`reference`) that tests compare against.

The packed int8/int4 CPU kernels are GEMV-shaped: their time grows with the row count as if each row were
its own matmul. From `MANY_ROWS` rows on (a prefill chunk, a batched decode step) a CPU layer instead
multiplies by a bfloat16 copy of its dequantized weight, a GEMM that AMX/AVX-512-bf16 CPUs run far
faster (3072x576, one thread: 32 rows 1.6 ms int4 vs 0.48 ms bf16; 512 rows 26 vs 2.6 ms; 8 rows about
even). The copy is made on the first many-row call and costs 2 bytes per weight (for SmolLM2-135M 212 MB
of projections and 57 MB of lm_head, beside 113 MB for the int8 + int4 packed weights); a layer that only
ever sees few rows never makes it. It is rebuilt when the packed weight changes (a weight update, also
one through a fused layer's views: the buffers' version counter says so).

A layer's buffers may be views into a fused layer's storage (q/k/v or gate/up quantized side by side,
see models/quantize.py): `load_float` writes a new float weight into them in place.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (32, 64, 128, 256)      # the CPU int4 kernel's
INT4_ROW_BLOCK = 64                        # the int4 packing interleaves rows in blocks of this many
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
CPU_ACT_DTYPE = torch.bfloat16
MANY_ROWS = 16                             # from this many rows on, CPU layers use their bfloat16 copy


def _torchao_utils() -> Any:
    """torchao's quantization helpers. Importing torchao logs a warning for each CUDA-only extension it
    cannot load on a CPU host; those kernels are not used here, so the warnings are held back."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization.utils as utils
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return utils


class QuantizedLinear(nn.Module):
    """What the quantized layers share: sizes, a float bias and the float dtype they stand in for."""
    method = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def extra_repr(self) -> str:
        return f"{self.method}, in_features={self.in_features}, out_features={self.out_features}"

    def load_float(self, weight: torch.Tensor) -> None:
        """Quantize a float weight [out, in] into this layer's buffers, in place."""
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The float weight [out, in] the layer computes with (what a reader by name sees)."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The engine's activations are [tokens, features] already: no reshapes (each op is a dispatch,
        # and at batch 1 the dispatches are a fifth of a step).
        out = self.matmul(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]))
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer in plain float32 torch: the dequantized weight times the input."""
        return F.linear(x.float(), self.dequantized().float(), None if self.bias is None else self.bias.float())


class CpuQuantizedLinear(QuantizedLinear):
    """int8/int4: the packed kernel for few rows, a bfloat16 GEMM with the dequantized weight for many."""
    _dense: tuple[tuple[int, ...], torch.Tensor] | None = None     # (buffer versions, bf16 weight)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < MANY_ROWS:
            return self.packed_matmul(x)
        return torch.mm(x.to(CPU_ACT_DTYPE), self.dense_weight().t()).to(x.dtype)

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The bfloat16 weight [out, in] (cached until a buffer is written: views of a fused layer share
        its version counter, so an update through either is seen)."""
        versions = tuple(b._version for _, b in self.named_buffers(recurse=False))
        if self._dense is None or self._dense[0] != versions:
            self._dense = (versions, self.dequantized().to(CPU_ACT_DTYPE).contiguous())
        return self._dense[1]


# ---------------------------------------------------------------- int8

def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [out, in], float32 scales [out]): symmetric, scale = max |w| of the row / 127."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(CpuQuantizedLinear):
    method = "int8"
    qweight: torch.Tensor           # int8 [out, in]
    scales: torch.Tensor            # bfloat16 [out]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias, weight.dtype)
        q, scales = int8_quantize(weight)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scales", scales.to(CPU_ACT_DTYPE), persistent=False)

    def load_float(self, weight: torch.Tensor) -> None:
        q, scales = int8_quantize(weight.to(self.qweight.device))
        self.qweight.copy_(q)
        self.scales.copy_(scales)

    def dequantized(self) -> torch.Tensor:
        return (self.qweight.float() * self.scales.float()[:, None]).to(self.dtype)

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x.to(CPU_ACT_DTYPE), self.qweight, self.scales)
        return out.to(x.dtype)


# ---------------------------------------------------------------- int4

def check_int4_shape(in_features: int, out_features: int, group_size: int, where: str = "") -> None:
    """Raise ValueError (naming the option) for shapes the int4 CPU kernel cannot take."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantization_group_size must be one of {INT4_GROUP_SIZES} for int4; got {group_size}")
    if in_features % group_size:
        raise ValueError(f"quantization=int4: quantization_group_size {group_size} does not divide "
                         f"in_features {in_features}{where}; pick one that does")
    if out_features % 16:
        raise ValueError(f"quantization=int4 needs out_features divisible by 16; got {out_features}{where}")


def int4_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 values 0..15 [out, in], bfloat16 scales-and-zeros [in / group_size, out, 2]): asymmetric
    min/max per group, w ≈ (q - 8) * scale + zero (torchao's tinygemm layout)."""
    utils = _torchao_utils()
    q, scales_and_zeros = utils.groupwise_affine_quantize_tensor(weight.detach().float(), 4, group_size,
                                                                 dtype=CPU_ACT_DTYPE)
    return q.to(torch.int32), scales_and_zeros


def int4_dequantize(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight the int4 values stand for (torchao's reference dequantization)."""
    utils = _torchao_utils()
    w: torch.Tensor = utils.groupwise_affine_dequantize_tensor(q, scales_and_zeros.float(), 4, group_size)
    return w.float()


class Int4Linear(CpuQuantizedLinear):
    method = "int4"
    packed: torch.Tensor            # uint8 [out, in / 2], the kernel's packing
    scales_and_zeros: torch.Tensor  # bfloat16 [in / group_size, out, 2]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias, weight.dtype)
        check_int4_shape(self.in_features, self.out_features, group_size)
        self.group_size = group_size
        packed, scales_and_zeros = self._pack(weight)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def _pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scales_and_zeros = int4_quantize(weight, self.group_size)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros

    def load_float(self, weight: torch.Tensor) -> None:
        packed, scales_and_zeros = self._pack(weight.to(self.packed.device))
        self.packed.copy_(packed)
        self.scales_and_zeros.copy_(scales_and_zeros)

    def dequantized(self) -> torch.Tensor:
        # The kernel applied to the identity gives the weight it uses, transposed (exact up to bfloat16).
        eye = torch.eye(self.in_features, dtype=CPU_ACT_DTYPE, device=self.packed.device)
        return self.packed_matmul(eye).t().to(self.dtype)

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        # A layer that is a slice of a fused one has a strided scales view; the kernel wants it dense.
        sz = self.scales_and_zeros if self.scales_and_zeros.is_contiguous() else self.scales_and_zeros.contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(CPU_ACT_DTYPE), self.packed, self.group_size, sz)
        return out.to(x.dtype)


# ---------------------------------------------------------------- fp8

def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scales [rows, 1]): one scale per row, max |x| of the row maps to 448.

    The scale is max|x| times float32(1/448), not max|x| / 448: torch's CUDA division by a Python number
    multiplies by its reciprocal while the CPU's divides, so only the product is the same value on both
    devices (and in the Triton kernel that must equal it bit for bit)."""
    scales = x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) * (1.0 / FP8_MAX)
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def _has_triton() -> bool:
    from rlserve.layers.triton_support import HAS_TRITON  # the activation and epilogue kernels are Triton's
    return HAS_TRITON


def _fp8_quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_quantize_rows in one Triton launch on CUDA outside autograd (layers/triton_fp8.py says why),
    the torch version elsewhere."""
    if x.is_cuda and not torch.is_grad_enabled() and _has_triton():
        from rlserve.layers import triton_fp8
        return triton_fp8.quantize_rows(x)
    return fp8_quantize_rows(x)


def _fp8_tensorwise_rows() -> int:
    raw = os.environ.get("RLSERVE_FP8_TENSORWISE_ROWS", "64")
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"RLSERVE_FP8_TENSORWISE_ROWS must be a whole number of rows, got {raw!r}") from None


# Up to this many rows an FP8 layer on CUDA runs the tensor-wise GEMM with unit scales and applies its
# scales in a Triton epilogue (layers/triton_fp8.py says why). 64 (the default): on an H100 a layer's four
# projections ran 1.40-1.48x bf16 that way up to 64 rows against 1.07-1.20x row-wise, and llama-3.1-8b
# offline 1.23x bf16 against 1.16x in the same call; past ~128 rows the row-wise GEMM is faster
# (docs/benchmarks.md). 0 keeps the row-wise GEMM everywhere.
FP8_TENSORWISE_ROWS = _fp8_tensorwise_rows()


class Fp8Linear(QuantizedLinear):
    """Weights e4m3 with a scale per output channel (HF's `weight_scale`), activations quantized per
    token (dynamic); one `torch._scaled_mm` with row-wise scales, bfloat16 out."""
    method = "fp8"
    qweight: torch.Tensor           # float8_e4m3fn [out, in]
    weight_scale: torch.Tensor      # float32 [1, out]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias, weight.dtype)
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"quantization=fp8 needs in/out features divisible by 16; got "
                             f"{self.in_features}x{self.out_features}")
        q, scales = fp8_quantize_rows(weight)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("weight_scale", scales.view(1, -1).contiguous(), persistent=False)
        # The tensor-wise GEMM's scales: made here, never inside a CUDA graph's capture.
        self.unit_scale = torch.ones((), dtype=torch.float32, device=weight.device)

    def load_float(self, weight: torch.Tensor) -> None:
        q, scales = fp8_quantize_rows(weight.to(self.qweight.device))
        self.qweight.copy_(q)
        self.weight_scale.copy_(scales.view(1, -1))

    def dequantized(self) -> torch.Tensor:
        return (self.qweight.float() * self.weight_scale.view(-1, 1)).to(self.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = _fp8_quantize_activations(x)
        if x.shape[0] <= FP8_TENSORWISE_ROWS and x.is_cuda and not torch.is_grad_enabled() and _has_triton():
            return self.tensorwise_matmul(xq, x_scale).to(x.dtype)
        out: torch.Tensor = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                             out_dtype=torch.bfloat16)
        return out.to(x.dtype)

    def tensorwise_matmul(self, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The tensor-wise GEMM (unit scales, float32 sums) and the scales in one Triton epilogue."""
        from rlserve.layers import triton_fp8
        acc = torch._scaled_mm(xq, self.qweight.t(), scale_a=self.unit_scale, scale_b=self.unit_scale,
                               out_dtype=torch.float32)
        return triton_fp8.scale_rows_cols(acc, x_scale, self.weight_scale)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Both operands quantized as the kernel sees them, then multiplied in float32."""
        flat = x.reshape(-1, x.shape[-1])
        xq, x_scale = fp8_quantize_rows(flat)
        out = (xq.float() * x_scale) @ self.dequantized().float().t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.view(*x.shape[:-1], self.out_features)


def make_quantized(method: str, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> QuantizedLinear:
    if method == "int8":
        return Int8Linear(weight, bias)
    if method == "int4":
        return Int4Linear(weight, bias, group_size)
    if method == "fp8":
        return Fp8Linear(weight, bias)
    raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")


class QuantizedWeight:
    """Stands in for a quantized layer's float `weight` where weights are updated or read by name
    (engine/weights.py): the shape and dtype of the float weight; `copy_` quantizes what it is given
    into the layer; `detach` reads the dequantized weight."""

    def __init__(self, layer: QuantizedLinear) -> None:
        self.layer = layer
        self.shape = torch.Size((layer.out_features, layer.in_features))
        self.dtype = layer.dtype

    def copy_(self, tensor: torch.Tensor) -> None:
        self.layer.load_float(tensor)

    def detach(self) -> torch.Tensor:
        return self.layer.dequantized()


class TiedQuantizedWeight(QuantizedWeight):
    """A float weight that a quantized layer also computes with: the input embedding tied to a quantized
    lm_head. The embedding stays a float lookup table; `copy_` updates it and quantizes the same tensor
    into the layer (so an update by either name reaches both); `detach` reads the float weight."""

    def __init__(self, weight: torch.Tensor, layer: QuantizedLinear) -> None:
        super().__init__(layer)
        self.weight = weight
        self.shape, self.dtype = weight.shape, weight.dtype

    def copy_(self, tensor: torch.Tensor) -> None:
        self.weight.copy_(tensor)
        self.layer.load_float(self.weight)

    def detach(self) -> torch.Tensor:
        return self.weight.detach()
