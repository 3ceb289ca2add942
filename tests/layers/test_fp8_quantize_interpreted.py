"""The FP8 activation kernel (layers/triton_fp8.py) on a CPU under Triton's interpreter, in a child process
(TRITON_INTERPRET must be set before the kernel is defined): its codes and scales equal the torch
quantization bit for bit on every e4m3 value, every midpoint between two (ties to even) and the floats
either side of each midpoint, signed zeros, and rows of mixed magnitudes in three dtypes. The GPU run of
the same comparison is test_quantized.py's test_fp8_activation_kernel_equals_the_torch_quantization.
"""
from __future__ import annotations

import torch
from triton_interpreter import run_under_triton_interpreter  # (same folder)


def check_kernel() -> None:
    from rlserve.layers.quantized import fp8_quantize_rows
    from rlserve.layers.triton_fp8 import quantize_rows

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(-1e9))
    row = torch.cat([grid, mids, up, down, torch.tensor([-0.0, 0.0, 448.0])]).view(1, -1)   # scale 1
    for x in (row, row.flip(-1)):
        q, scales = quantize_rows(x)
        ref_q, ref_scales = fp8_quantize_rows(x)
        assert torch.equal(scales, ref_scales) and scales.item() == 1.0
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(5, 3000 + 8, generator=gen).to(dtype)[:, 4:3004]       # strided rows
        x[0] *= 1e-3
        x[-1, :1500] *= 1e4
        x[1] = 0
        q, scales = quantize_rows(x)
        ref_q, ref_scales = fp8_quantize_rows(x)
        assert torch.equal(scales, ref_scales)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), dtype


def test_fp8_activation_kernel_under_the_triton_interpreter():
    assert "fp8 ok" in run_under_triton_interpreter(__file__)


if __name__ == "__main__":   # the child process
    check_kernel()
    print("fp8 ok")
