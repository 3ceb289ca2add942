"""The FP8 activation kernel (layers/triton_fp8.py) on a CPU under Triton's interpreter, so that CI checks
its logic without a GPU: rows over several chunks and a partial one, strided rows, a zero row. The scales
are exact; the interpreter's e4m3 conversion is not bit-faithful, so the codes are checked loosely here
(the GPU test in test_quantized.py holds them to the torch reference bit for bit)."""
from __future__ import annotations

import torch
from triton_interpreter import run_under_triton_interpreter  # (same folder)


def check_kernel() -> None:
    from rlserve.layers.quantized import fp8_quantize_rows
    from rlserve.layers.triton_fp8 import CHUNK, quantize_rows

    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((1, 16), (5, CHUNK), (3, 2 * CHUNK + 37)):
        x = torch.randn(rows, cols + 8, generator=gen)[:, 3:cols + 3]          # strided rows
        x[0, : cols // 3] *= 50
        if rows > 2:
            x[1] = 0
        q, scales = quantize_rows(x)
        ref_q, ref_scales = fp8_quantize_rows(x)
        assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scales.shape == (rows, 1)
        assert torch.equal(scales, ref_scales), (rows, cols)
        # The interpreter's e4m3 rounding is not torch's (it sends 1.98 to 1.0 where torch gives 2.0), so
        # most codes, not all, equal the reference's; a code written to the wrong place or left unwritten
        # would miss it everywhere. Every value keeps its sign and lies within a factor of two.
        same = (q.view(torch.uint8) == ref_q.view(torch.uint8)).float().mean().item()
        assert same >= 0.9, (rows, cols, same)
        got, floor = q.float() * scales, scales * 2.0 ** -6
        assert ((got - x).abs() <= x.abs() / 2 + floor).all(), (rows, cols)
        assert (q.float().abs().amax(dim=1)[x.abs().amax(dim=1) > 0] == 448.0).all()

def test_fp8_activation_kernel_under_the_triton_interpreter():
    assert "fp8 quant ok" in run_under_triton_interpreter(__file__)


if __name__ == "__main__":   # the child process
    check_kernel()
    print("fp8 quant ok")
