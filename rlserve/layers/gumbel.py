"""Sampling from softmax(logits / T) in one pass over the vocabulary: the Gumbel-max trick.

argmax_i(logits_i / T + G_i) with G_i = -log(-log U_i), U_i uniform, picks token i with probability
softmax(logits / T)_i — no softmax, no normalisation, no sort. The Triton kernel reads each row of
logits once (bf16 straight from the LM head), draws its uniforms in registers from the row's own
seed (Philox keyed by it, counted by vocabulary position: a row's draw depends on its seed alone,
never on the batch around it) and keeps a running argmax; rows are cut into chunks (more for small
batches, so the GPU stays full) whose winners a second tiny launch reduces. Sampling a batch reads B × V × 2 bytes once.
A row with T = 0 takes the plain argmax (greedy rows can share the launch).
"""
from __future__ import annotations

import torch

from rlserve.layers.triton_support import HAS_TRITON, tl, triton
from rlserve.layers.triton_support import jit as _jit


def _jit_unspecialized(*names: str):
    # Triton compiles a variant per integer argument that is 1 or a multiple of 16. For a count that
    # follows the batch size, that would compile anew in the middle of a run.
    def wrap(fn):
        return triton.jit(do_not_specialize=list(names))(fn) if HAS_TRITON else fn
    return wrap


@_jit
def _gumbel_update(Row, MaskRow, offs, hi, u, greedy, inv_t, best, best_idx, HAS_MASK: tl.constexpr):
    mask = offs < hi
    x = tl.load(Row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    # In base 2: log2(e)·(x/T + G) = x·log2(e)/T − log2(−log2 u) + const, the same argmax, and log2
    # is one hardware instruction where log is several. u = 0 gives −inf (never chosen).
    noise = -tl.log2(-tl.log2(u))
    score = tl.where(greedy, x, x * inv_t + noise)
    if HAS_MASK:   # a grammar's packed bitmask: token i is allowed iff bit i % 32 of word i // 32 is set
        words = tl.load(MaskRow + offs // 32, mask=mask, other=0)
        mask = mask & (((words >> (offs % 32)) & 1) != 0)
    score = tl.where(mask, score, float("-inf"))
    better = score > best     # strict, and offsets grow: the lowest index wins a tie within a lane
    return tl.where(better, score, best), tl.where(better, offs, best_idx)


@_jit
def _gumbel_chunk_kernel(Logits, Temps, Seeds, Bitmask, BestScore, BestIdx, stride_row, stride_mask, vocab, chunk,
                         QUARTER: tl.constexpr, HAS_MASK: tl.constexpr):
    """Best Gumbel score of one chunk of one row. Each Philox call yields four uniforms, used for four
    quarter-blocks of the chunk: a quarter of the random-number work of one call per element."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    temp = tl.load(Temps + row)
    seed = tl.load(Seeds + row)
    greedy = temp <= 0.0
    inv_t = 1.4426950408889634 / tl.where(greedy, 1.0, temp)      # log2(e) / T; unused by greedy rows
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_idx = tl.zeros([QUARTER], tl.int32)
    row_logits = Logits + row.to(tl.int64) * stride_row
    mask_row = Bitmask + row.to(tl.int64) * stride_mask
    lo = part * chunk
    hi = tl.minimum(lo + chunk, vocab)
    # Philox counters: one per group of four elements, unique over the row's positions. Chunks hold
    # whole blocks of 4 × QUARTER, so how the row is chunked doesn't change any element's uniform.
    offs_q = tl.arange(0, QUARTER)
    for start in range(lo, hi, 4 * QUARTER):
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + offs_q)
        best, best_idx = _gumbel_update(row_logits, mask_row, start + offs_q, hi, u0, greedy, inv_t,
                                        best, best_idx, HAS_MASK)
        best, best_idx = _gumbel_update(row_logits, mask_row, start + QUARTER + offs_q, hi, u1, greedy, inv_t,
                                        best, best_idx, HAS_MASK)
        best, best_idx = _gumbel_update(row_logits, mask_row, start + 2 * QUARTER + offs_q, hi, u2, greedy,
                                        inv_t, best, best_idx, HAS_MASK)
        best, best_idx = _gumbel_update(row_logits, mask_row, start + 3 * QUARTER + offs_q, hi, u3, greedy,
                                        inv_t, best, best_idx, HAS_MASK)
    top = tl.max(best, 0)
    idx = tl.min(tl.where(best == top, best_idx, vocab), 0)
    tl.store(BestScore + row * tl.num_programs(1) + part, top)
    tl.store(BestIdx + row * tl.num_programs(1) + part, idx)


@_jit_unspecialized("parts")
def _gumbel_reduce_kernel(BestScore, BestIdx, Out, vocab, parts, BLOCK_P: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_P)
    mask = offs < parts
    score = tl.load(BestScore + row * parts + offs, mask=mask, other=float("-inf"))
    idx = tl.load(BestIdx + row * parts + offs, mask=mask, other=vocab)
    top = tl.max(score, 0)
    # Ties (greedy rows) resolve to the lowest index, as torch.argmax does.
    tl.store(Out + row, tl.min(tl.where(score == top, idx, vocab), 0).to(tl.int64))


QUARTER = 512                 # elements per quarter-block: 2,048 per Philox round over a program
TARGET_PROGRAMS = 1024        # enough programs for several waves over an H100's 132 SMs
MAX_PARTS = 64                # chunks per row at most; a run-time count below it, so batch sizes that
                              # need different counts share one compiled kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gumbel_parts(batch: int, vocab: int) -> int:
    """Chunks per row: small batches split the vocabulary more, so that every batch fills the GPU."""
    blocks = _cdiv(vocab, 4 * QUARTER)
    want = _cdiv(TARGET_PROGRAMS, max(batch, 1))
    return max(1, min(blocks, MAX_PARTS, 1 << (want - 1).bit_length()))


def gumbel_argmax(logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor,
                  bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of `logits` [B, V] (any float dtype, last dim contiguous), drawn from
    softmax(logits / temps) with temps [B] float32 and the rows' Philox seeds [B] int64 (in [0, 2**31),
    distinct per row unless the same draw is wanted) on the same device; temps ≤ 0 → argmax.

    bitmask: [B, ≥ ceil(V / 32)] int32, xgrammar's packed layout; tokens whose bit is clear are drawn
    as if their logit were -inf (the draw equals that of logits masked beforehand, without a pass
    over them)."""
    b, vocab = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        per_block = 4 * QUARTER
        chunk = _cdiv(_cdiv(vocab, gumbel_parts(b, vocab)), per_block) * per_block   # whole blocks
        parts = _cdiv(vocab, chunk)
        score = torch.empty(b, parts, dtype=torch.float32, device=logits.device)
        idx = torch.empty(b, parts, dtype=torch.int32, device=logits.device)
        if bitmask is not None and (bitmask.shape[0] != b or bitmask.shape[1] * 32 < vocab
                                    or bitmask.dtype != torch.int32 or bitmask.stride(-1) != 1):
            raise ValueError(f"bitmask {tuple(bitmask.shape)} {bitmask.dtype} does not cover logits {(b, vocab)}")
        mask_arg = bitmask if bitmask is not None else seeds      # any pointer: unused without a mask
        _gumbel_chunk_kernel[(b, parts)](logits, temps, seeds, mask_arg, score, idx, logits.stride(0),
                                         mask_arg.stride(0), vocab, chunk, QUARTER=QUARTER,
                                         HAS_MASK=bitmask is not None, num_warps=4)
        _gumbel_reduce_kernel[(b,)](score, idx, out, vocab, parts, BLOCK_P=MAX_PARTS, num_warps=1)
    return out


def gumbel_argmax_reference(logits: torch.Tensor, temps: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """The same draw in plain torch (its own random stream): the kernel's test reference."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_min(1e-20)
    noise = -torch.log(-torch.log(u))
    t = temps.clamp_min(1e-20)[:, None]
    score = torch.where(temps[:, None] > 0, logits.float() / t + noise, logits.float())
    return score.argmax(dim=-1)
