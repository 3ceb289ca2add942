"""The Triton attention kernels (fused KV store, split-K decode and its merge, extend, cascade decode over
shared prefixes) against the torch reference on a CPU, under Triton's interpreter, so that CI checks
their logic without a GPU.

The interpreter must be switched on before any kernel is defined, so the checks run in a child
process. It computes float32 and float16 dots faithfully but not bfloat16 ones (it holds bf16 as raw
16-bit integers) nor, closely enough, e4m3 conversions: those stay with the GPU tests in
test_triton_attention.py, test_cascade_attention.py and test_fp8_and_gumbel.py. An fp8 pool gets one
loose check here, of where extend applies the scales.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from triton_interpreter import run_under_triton_interpreter  # (same folder)


def check_kernels() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_cascade_attention import check_cascade_decode
    from test_triton_attention import Case, check_against_torch, check_repeated_decode

    for dtype in (torch.float32, torch.float16):
        seq = [1, 2, 63, 65, 300, 700]                     # one token, tile edges, several spans
        # float16 differs from float32 only in its loads and stores: one split count and grouping cover it.
        for splits in (None, 1, 3) if dtype == torch.float32 else (3,):
            for heads, kv_heads in ((8, 2), (2, 2)) if dtype == torch.float32 else ((8, 2),):
                case = Case([s - 1 for s in seq], [1] * len(seq), heads, kv_heads, 64, dtype, "cpu", seed=heads)
                assert case.batch.is_decode
                check_against_torch(case, dtype, max_kv_splits=splits)
        # every layer of a step and the same layer again, with one backend
        case = Case([s - 1 for s in seq], [1] * len(seq), 4, 2, 64, dtype, "cpu", seed=7)
        check_repeated_decode(case, dtype, max_kv_splits=3)
        # extend: no prefix, short and long prefixes, one new token that is not a decode batch
        check_against_torch(Case([0, 5, 40, 100], [3, 17, 30, 1], 4, 2, 64, dtype, "cpu", seed=2), dtype)
        check_against_torch(Case([0, 9], [20, 5], 6, 3, 80, dtype, "cpu", seed=3), dtype)   # head_dim 80
        # several query blocks: blocks wholly below the diagonal (read unmasked), edges off the block size
        check_against_torch(Case([0, 33], [150, 70], 4, 2, 64, dtype, "cpu", seed=4), dtype)
        check_against_torch(Case([0], [100], 2, 1, 80, dtype, "cpu", seed=5), dtype)
    # Shorter prefixes and fewer heads than on the GPU (the interpreter runs one program at a time; the
    # GPU test keeps 8 x 8 heads), still several tiles and one K/V head per query head in the last case.
    for heads, kv_heads, dim in ((4, 2, 64), (16, 2, 128), (2, 2, 64)):
        check_cascade_decode(torch.float32, heads, kv_heads, dim, [(5, 300), (2, 130), (3, 520)])
    check_fp8_extend_scales()


def check_fp8_extend_scales() -> None:
    """Extend over an fp8 pool's prefix applies K's and V's scales where they belong. The interpreter's
    e4m3 conversions are not exact, so this is a loose check (as on the GPU, the kernel attends to the
    new tokens unquantised and the reference reads them back from the pool): K's scales are ~300× V's
    here, so scales applied to the wrong tensor or axis land far outside it."""
    from test_fp8_and_gumbel import copy_pool, fp8_case

    from rlserve.layers.attention.torch_backend import TorchAttentionBackend
    from rlserve.layers.attention.triton_backend import TritonAttentionBackend

    case = fp8_case([0, 64, 133], [50, 17, 90], 4, 2, 64, seed=3, dtype=torch.float32, device="cpu")
    ref = case.run(TorchAttentionBackend(copy_pool(case.pool), case.scale))
    out = case.run(TritonAttentionBackend(case.pool, case.scale))
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean()
    assert (out - ref).abs().max() < 0.25 * ref.abs().max()


def test_attention_kernels_under_the_triton_interpreter_match_torch():
    assert "attention ok" in run_under_triton_interpreter(__file__)


if __name__ == "__main__":   # the child process
    check_kernels()
    print("attention ok")
