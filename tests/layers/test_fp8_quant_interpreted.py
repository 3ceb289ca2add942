"""The FP8 activation kernel (layers/triton_fp8.py) on a CPU under Triton's interpreter, so that CI checks
its logic without a GPU: codes and scales equal the torch quantization bit for bit on every e4m3 value,
every midpoint between two (ties to even), the floats either side of each midpoint and signed zeros, and
on rows over several chunks and a partial one, strided rows, a zero row, mixed magnitudes, three dtypes
(the kernel rounds to e4m3 itself, so the interpreter's own float32 -> e4m3 cast, which mis-rounds where
the mantissa carries into the exponent, only ever sees exact values). The tensor-wise GEMM's epilogue
(scale_rows_cols) is held to torch's arithmetic exactly."""
from __future__ import annotations

import torch
from triton_interpreter import run_under_triton_interpreter  # (same folder)


def check_kernel() -> None:
    from rlserve.layers.quantized import fp8_quantize_rows
    from rlserve.layers.triton_fp8 import CHUNK, quantize_rows

    def check_equal(x: torch.Tensor) -> None:
        q, scales = quantize_rows(x)
        ref_q, ref_scales = fp8_quantize_rows(x)
        assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scales.shape == (x.shape[0], 1)
        assert torch.equal(scales, ref_scales), tuple(x.shape)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), (tuple(x.shape), x.dtype)

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(-1e9))
    row = torch.cat([grid, mids, up, down, torch.tensor([-0.0, 0.0, 448.0])]).view(1, -1)   # scale 1
    check_equal(row)
    check_equal(row.flip(-1))

    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((1, 16), (5, CHUNK), (3, 2 * CHUNK + 37)):
        x = torch.randn(rows, cols + 8, generator=gen)[:, 3:cols + 3]          # strided rows
        x[0, : cols // 3] *= 50
        if rows > 2:
            x[1] = 0
        check_equal(x)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(5, 3000 + 8, generator=gen).to(dtype)[:, 4:3004]
        x[0] *= 1e-3
        x[-1, :1500] *= 1e4
        check_equal(x)
    check_epilogue(gen)


def check_epilogue(gen: torch.Generator) -> None:
    import pytest

    from rlserve.layers.triton_fp8 import EPILOGUE_BLOCK, scale_rows_cols

    for rows, cols in ((1, 16), (3, EPILOGUE_BLOCK), (4, 2 * EPILOGUE_BLOCK + 40)):
        acc = (torch.randn(rows, cols + 5, generator=gen) * 1e4)[:, 2:cols + 2]    # strided rows
        row_scales = torch.rand(rows, 1, generator=gen) + 1e-3
        col_scales = torch.rand(1, cols, generator=gen) * 1e-3
        ref = acc * row_scales * col_scales
        assert torch.equal(scale_rows_cols(acc, row_scales, col_scales, torch.float32), ref), (rows, cols)
        # The interpreter's float32 -> bfloat16 cast truncates where the GPU's rounds to nearest even (the
        # GPU test holds that bit for bit): here each value is within one bfloat16 step of torch's.
        got = scale_rows_cols(acc, row_scales, col_scales)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, cols)
        step = ref.abs() * 2.0 ** -7
        assert ((got.float() - ref).abs() <= step).all(), (rows, cols)
    with pytest.raises(ValueError, match="float32 sums"):
        scale_rows_cols(torch.zeros(2, 4, dtype=torch.bfloat16), torch.ones(2, 1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="scales of 3 rows"):
        scale_rows_cols(torch.zeros(2, 4), torch.ones(3, 1), torch.ones(1, 4))

def test_fp8_activation_kernel_under_the_triton_interpreter():
    assert "fp8 quant ok" in run_under_triton_interpreter(__file__)


if __name__ == "__main__":   # the child process
    check_kernel()
    print("fp8 quant ok")
