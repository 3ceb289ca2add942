"""Sampling from softmax(logits / T) in one pass over the vocabulary: the Gumbel-max trick.

argmax_i(logits_i / T + G_i) with G_i = -log(-log U_i), U_i uniform, picks token i with probability
softmax(logits / T)_i — no softmax, no normalisation, no sort. The Triton kernel reads each row of
logits once (bf16 straight from the LM head), draws its uniforms in registers from a per-call seed
and keeps a running argmax, so sampling a batch is one launch that reads B × V × 2 bytes.
A row with T = 0 takes the plain argmax (greedy rows can share the launch).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False


def _jit(fn):
    return triton.jit(fn) if HAS_TRITON else fn


@_jit
def _gumbel_argmax_kernel(Logits, Temps, Out, seed, stride_row, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temp = tl.load(Temps + row)
    greedy = temp <= 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    base = row.to(tl.int64) * stride_row
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        x = tl.load(Logits + base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, row * vocab + offs)
        # u = 0 gives -inf noise (never chosen); u < 1 always, so the noise stays finite above.
        noise = -tl.log(-tl.log(u))
        score = tl.where(greedy, x, x * inv_t + noise)
        score = tl.where(mask, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, offs, best_idx)
    top = tl.max(best, 0)
    # Ties (greedy rows) resolve to the lowest index, as torch.argmax does.
    idx = tl.min(tl.where(best == top, best_idx, vocab), 0)
    tl.store(Out + row, idx.to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, temps: torch.Tensor, seed: int) -> torch.Tensor:
    """One token id per row of `logits` [B, V] (any float dtype, last dim contiguous), drawn from
    softmax(logits / temps) with temps [B] float32 on the same device; temps ≤ 0 → argmax."""
    b, vocab = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        _gumbel_argmax_kernel[(b,)](logits, temps, out, seed, logits.stride(0), vocab,
                                    BLOCK=2048, num_warps=8)
    return out


def gumbel_argmax_reference(logits: torch.Tensor, temps: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """The same draw in plain torch (its own random stream): the kernel's test reference."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_min(1e-20)
    noise = -torch.log(-torch.log(u))
    t = temps.clamp_min(1e-20)[:, None]
    score = torch.where(temps[:, None] > 0, logits.float() / t + noise, logits.float())
    return score.argmax(dim=-1)
