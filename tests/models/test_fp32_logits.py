"""Float32 logits from a 16-bit model: the lm_head keeps its float32 accumulator instead of rounding
to bf16, where near-equal logits collapse into exact ties."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rlserve import LLM, SamplingParams
from rlserve.layers.logits import float32_logits


def _near_tie() -> tuple[torch.Tensor, torch.Tensor]:
    """Two vocabulary rows whose logits differ by 1/256 at a logit of 32, where bf16 steps by 0.25."""
    hidden = torch.ones(1, 64, dtype=torch.bfloat16)
    weight = torch.full((3, 64), 0.5, dtype=torch.bfloat16)
    weight[1, 0] += 2 ** -8
    weight[2] = -0.5
    return hidden, weight


def test_float32_logits_keep_a_difference_bf16_rounds_away():
    hidden, weight = _near_tie()
    rounded = F.linear(hidden, weight)
    assert rounded[0, 0] == rounded[0, 1] and rounded.argmax() == 0         # tied, broken by token id
    got = float32_logits(hidden, weight)
    assert got.dtype == torch.float32
    assert got[0, 1] - got[0, 0] == 2 ** -8 and got.argmax() == 1
    exact = hidden.double() @ weight.double().t()
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)


def test_float32_logits_carry_gradients_to_16_bit_parameters():
    torch.manual_seed(0)
    hidden = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(7, 16, dtype=torch.bfloat16, requires_grad=True)
    float32_logits(hidden, weight).square().sum().backward()
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    F.linear(h, w).square().sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad, h.grad.bfloat16())
    torch.testing.assert_close(weight.grad, w.grad.bfloat16())


def _top2_ties(llm: LLM, prompts: list[list[int]]) -> tuple[int, int]:
    """(positions whose two best prompt logprobs are exactly equal, positions)."""
    ties = total = 0
    for out in llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False):
        for d in out.prompt_logprobs[1:]:
            best = sorted(d.values(), reverse=True)[:2]
            ties += best[0] == best[1]
            total += 1
    return ties, total


def test_a_bf16_model_reading_text_has_no_tied_logits_with_float32_logits(default_model_dir):
    """SmolLM2 in bf16 reading English: bf16 logits tie the top two tokens at a few percent of positions
    (~6% measured); float32 logits at none."""
    docs = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rounded = LLM(dtype="bfloat16", fp32_logits=False)
    ids = rounded.encode(docs)[1]
    prompts = [ids[i * 150:(i + 1) * 150] for i in range(3)]
    ties, total = _top2_ties(rounded, prompts)
    assert total == 3 * 149 and ties >= 5
    del rounded
    fp32 = LLM(dtype="bfloat16")
    assert fp32.engine.model.fp32_logits
    assert _top2_ties(fp32, prompts) == (0, total)
