"""The fused Gumbel-max sampling kernel on a CPU under Triton's interpreter (in a child process, which
must set TRITON_INTERPRET before the kernel is defined), so that CI checks its logic without a GPU:
the softmax distribution, greedy rows beside sampled ones, reproducible seeds, a vocabulary that is no
multiple of the block, and the grammar bitmask drawing exactly as logits masked to -inf beforehand.
The GPU versions of these checks (bf16 logits, a full vocabulary) are in test_fp8_and_gumbel.py.
"""
from __future__ import annotations

import pytest
import torch
from triton_interpreter import run_under_triton_interpreter  # (same folder)


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] bool -> xgrammar's bitmask layout: int32 words, bit i of word w = token 32·w + i."""
    rows, vocab = allowed.shape
    words = (vocab + 31) // 32
    padded = torch.zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    packed = (padded.view(rows, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def check_kernel() -> None:
    from rlserve.layers.gumbel import gumbel_argmax

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    rows, temp = 1500, 0.8
    ids = gumbel_argmax(logits.repeat(rows, 1), torch.full((rows,), temp), torch.arange(rows) + 1234)
    freq = torch.bincount(ids, minlength=8).float() / rows
    p = torch.softmax(logits / temp, -1)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / rows).sqrt() + 1e-4).all(), (freq, p)

    gen = torch.Generator().manual_seed(0)
    rows, vocab = 12, 5000 + 37
    logits = torch.randn(rows, vocab, generator=gen)
    temps = torch.full((rows,), 1.0)
    temps[::2] = 0.0                                   # greedy rows share the launch
    seeds = torch.arange(rows)
    a = gumbel_argmax(logits, temps, seeds + 7)
    assert torch.equal(a, gumbel_argmax(logits, temps, seeds + 7))
    assert torch.equal(a[::2], logits[::2].argmax(-1))
    assert not torch.equal(a[1::2], gumbel_argmax(logits, temps, seeds + 1000)[1::2])

    allowed = torch.rand(rows, vocab, generator=gen) < torch.linspace(0.001, 0.5, rows)[:, None]
    allowed[-2:] = True
    allowed[:, vocab - 1] |= torch.arange(rows) % 5 == 0
    masked = logits.masked_fill(~allowed, float("-inf"))
    for s in (0, 1000):
        got = gumbel_argmax(logits, temps, seeds + s, pack_bitmask(allowed))
        assert torch.equal(got, gumbel_argmax(masked, temps, seeds + s))
        assert allowed[torch.arange(rows), got].all()
    with pytest.raises(ValueError, match="does not cover"):
        gumbel_argmax(logits, temps, seeds, pack_bitmask(allowed)[:, :-1])


def test_gumbel_kernel_under_the_triton_interpreter():
    assert "gumbel ok" in run_under_triton_interpreter(__file__)


if __name__ == "__main__":   # the child process
    check_kernel()
    print("gumbel ok")
