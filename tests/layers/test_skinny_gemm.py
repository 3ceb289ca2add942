"""The decode GEMM (layers/skinny_gemm.py) against a float64 product: single-pass and split-K launches,
ragged edges in every dimension, counters left at zero, and rows that do not depend on the batch they
ride in (a padded CUDA-graph batch must give the unpadded batch's rows bit for bit).

On a CPU the kernel runs under Triton's interpreter in a child process; on a GPU compiled, also inside
a CUDA graph.
"""
from __future__ import annotations

import sys

import pytest
import torch

from triton_interpreter import run_under_triton_interpreter  # same folder

TOL = {torch.float16: 2 ** -9, torch.bfloat16: 2 ** -7}


def check(device: str) -> None:
    from rlserve.layers import skinny_gemm as sg

    gen = torch.Generator().manual_seed(0)
    small = sg.GemmLaunch(block_n=16, block_k=32, num_warps=4, num_stages=2, target_programs=16)
    cases = [(1, 48, 64, None), (5, 100, 200, small), (17, 40, 600, small), (40, 33, 96, small),
             (3, 64, 1024, None)]
    if device == "cuda":   # real shapes and the largest row block only compiled
        cases += [(m, n, k, None) for m in (1, 16, 64, 100, 256) for n, k in ((4096, 1024), (1024, 3072))]
    # Triton's interpreter computes bf16 dots wrongly (garbage of ~1e10), so bf16 runs on the GPU only.
    for dtype in (torch.bfloat16, torch.float16) if device == "cuda" else (torch.float16,):
        for m, n, k, launch in cases:
            x = torch.randn(m, k, generator=gen).to(dtype).to(device)
            w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(device)
            y = sg.skinny_linear(x, w, launch=launch)
            ref = x.double() @ w.double().T
            assert y.dtype == dtype and y.shape == (m, n)
            torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=TOL[dtype],
                                       atol=TOL[dtype] * max(ref.abs().max().item(), 1.0))
            _, launch_used, _, split, _ = sg._plan(m, n, k, launch)
            if split > 1:
                counters = sg._workspaces[torch.device(device)][1]
                assert int(counters.abs().sum()) == 0, "a split launch left a counter set"
            # The same rows inside a larger batch (and a second launch) come out identical.
            padded = torch.cat([x, torch.randn(max(16, m) + 3 - m, k, generator=gen).to(dtype).to(device)])
            again = sg.skinny_linear(padded, w, launch=launch)[:m]
            assert torch.equal(again, y), f"rows changed with the batch around them ({m}x{n}x{k})"
    # A transposed weight or a bias is refused by `supported`, and a bias by the kernel itself.
    x = torch.randn(4, 8).to(torch.float16).to(device)
    w = torch.randn(8, 8).to(torch.float16).to(device)
    assert not sg.supported(x, w.T, None) and not sg.supported(x, w, torch.zeros(8).to(device))
    with pytest.raises(ValueError):
        sg.skinny_linear(x, w, torch.zeros(8, dtype=torch.float16, device=device))
    print("skinny gemm ok")


def test_skinny_gemm_under_the_triton_interpreter_matches_float64():
    assert "skinny gemm ok" in run_under_triton_interpreter(__file__)


def test_supported_is_false_off_cuda():
    from rlserve.layers import skinny_gemm as sg
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert not sg.supported(x, torch.randn(8, 8, dtype=torch.bfloat16))


@pytest.mark.gpu
def test_skinny_gemm_on_the_gpu_matches_float64():
    check("cuda")


@pytest.mark.gpu
def test_skinny_gemm_replays_in_a_cuda_graph():
    from rlserve.layers import skinny_gemm as sg
    x = torch.randn(48, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) / 45
    sg.reserve(sg.MAX_ROWS, 1024, 2048, x.device)
    eager = sg.skinny_linear(x, w)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = sg.skinny_linear(x, w)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, sg.skinny_linear(x, w))


if __name__ == "__main__":
    check(sys.argv[1] if len(sys.argv) > 1 else "cpu")
