from __future__ import annotations

import math
import random

import pytest
import torch

from rlserve.engine.sampler import Sampler, SampleRow, apply_penalties, prompt_logprobs
from rlserve.sampling import SamplingParams


def row(gen: random.Random | None = None, prompt=(), output=(), banned=(), **kw) -> SampleRow:
    return SampleRow(SamplingParams(**kw), gen, list(prompt), list(output), list(banned))


def draw_counts(logits_1d: torch.Tensor, n: int, seed: int = 0, **kw) -> torch.Tensor:
    """Sample n times (one batch of n identical rows) and count tokens."""
    sampler = Sampler(seed=seed)
    out = sampler(logits_1d.expand(n, -1), [row(**kw) for _ in range(n)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_1d.numel())


# probabilities 0.4, 0.3, 0.15, 0.1, 0.05
CRAFTED = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log()


def allowed(counts: torch.Tensor) -> set[int]:
    return set(torch.nonzero(counts).flatten().tolist())


def test_greedy_is_argmax_any_dtype():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dtype)
        out = Sampler()(x, [row(temperature=0.0) for _ in range(6)])
        assert out.token_ids == x.float().argmax(-1).tolist()
        assert out.logprobs == [None] * 6
    # Ties go to the first of the largest values, as argmax's do (a coarse grid makes many).
    tied = torch.randint(0, 3, (8, 5000)).float()
    out = Sampler()(tied, [row(temperature=0.0) for _ in range(8)])
    assert out.token_ids == tied.argmax(-1).tolist()


def test_top_k_1_is_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, 300)
    out = Sampler(seed=3)(logits, [row(temperature=1.5, top_k=1) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_rows():
    torch.manual_seed(2)
    logits = torch.randn(4, 50)
    rows = [row(temperature=0.0), row(temperature=1.0, top_k=3), row(temperature=0.0), row(temperature=0.8)]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == logits[2].argmax().item()
    assert out.token_ids[1] in logits[1].topk(3).indices.tolist()


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(top_k=2), {0, 1}),
        (dict(top_p=0.6), {0, 1}),          # mass before token 2 is 0.7 >= 0.6
        (dict(top_p=0.75), {0, 1, 2}),
        (dict(min_p=0.3), {0, 1, 2}),       # threshold 0.12
        (dict(min_p=0.5), {0, 1}),          # threshold 0.2
        (dict(top_k=3, top_p=0.8), {0, 1}),  # top-p over the renormalised top-3: 0, .47, .82
        (dict(min_p=0.2, top_k=3), {0, 1, 2}),
        (dict(top_p=1e-9), {0}),            # filtering never removes the argmax
        (dict(), {0, 1, 2, 3, 4}),
    ],
)
def test_filters_restrict_support(kw, expected):
    counts = draw_counts(CRAFTED, 4000, temperature=1.0, **kw)
    assert allowed(counts) == expected


def test_top_p_applies_after_temperature():
    # At T=0.5 the probabilities sharpen to ~[.55,.31,.08,.04,.01]: top_p=0.6 keeps two tokens,
    # while T=3 flattens them enough that three survive.
    assert allowed(draw_counts(CRAFTED, 3000, temperature=0.5, top_p=0.6)) == {0, 1}
    assert allowed(draw_counts(CRAFTED, 3000, temperature=3.0, top_p=0.6)) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0])
    n = 20000
    counts = draw_counts(logits, n, seed=123, temperature=temperature).double()
    expected = torch.softmax(logits.double() / temperature, -1) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # df=4: p ≈ 0.0004


def test_tiny_temperature_never_nan_and_picks_argmax():
    torch.manual_seed(4)
    logits = torch.randn(5, 1000) * 10
    for t in (1e-5, 1e-30, 1e-45):
        out = Sampler()(logits, [row(temperature=t, top_p=0.9, min_p=0.1) for _ in range(5)])
        assert out.token_ids == logits.argmax(-1).tolist()


def test_penalty_formulas_exact():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5], [2.0, -1.0, 0.5, 3.0, -0.5]])
    rows = [
        row(prompt=[0, 4], output=[1, 1, 2], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        row(prompt=[0, 4], output=[1, 1, 2]),  # no penalties: untouched
    ]
    out = apply_penalties(logits, rows)
    # repetition over prompt+output: positive / 2, negative * 2; then frequency/presence on output only
    expected0 = torch.tensor([
        2.0 / 2,                      # prompt only
        -1.0 * 2 - 0.5 * 2 - 0.25,    # output twice
        0.5 / 2 - 0.5 * 1 - 0.25,     # output once
        3.0,                          # unseen
        -0.5 * 2,                     # prompt only
    ])
    torch.testing.assert_close(out[0], expected0)
    torch.testing.assert_close(out[1], logits[1])
    assert logits[0, 0] == 2.0  # input not modified


def test_penalties_apply_in_greedy():
    logits = torch.tensor([[3.0, 2.9, 0.0, -5.0]])
    assert Sampler()(logits, [row(temperature=0.0)]).token_ids == [0]
    assert Sampler()(logits, [row(temperature=0.0, output=[0], presence_penalty=0.2)]).token_ids == [1]
    assert Sampler()(logits, [row(temperature=0.0, prompt=[0], repetition_penalty=1.1)]).token_ids == [1]
    # frequency penalty scales with the count: one occurrence isn't enough, two are
    assert Sampler()(logits, [row(temperature=0.0, output=[0], frequency_penalty=0.05)]).token_ids == [0]
    assert Sampler()(logits, [row(temperature=0.0, output=[0, 0], frequency_penalty=0.06)]).token_ids == [1]
    # negative penalties encourage repetition
    assert Sampler()(logits, [row(temperature=0.0, output=[1], presence_penalty=-0.2)]).token_ids == [1]


def test_banned_ids_never_sampled():
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.5]])
    assert Sampler()(logits, [row(temperature=0.0, banned=[0])]).token_ids == [1]
    n = 3000
    out = Sampler()(logits.expand(n, -1), [row(banned=[0, 3], temperature=1.0) for _ in range(n)])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4)
    assert counts[0] == 0 and counts[3] == 0 and counts[1] > 0 and counts[2] > 0


def _seeded_run(seed: int, logits: torch.Tensor, others: list[tuple[torch.Tensor, SampleRow]], pos: int,
                steps: int = 10) -> list[int]:
    """Run `steps` sampling steps with the seeded row at batch position `pos`."""
    sampler = Sampler(seed=99)
    gen = sampler.make_generator(seed)
    got = []
    for _ in range(steps):
        seeded = (logits, row(gen, seed=seed, temperature=0.9, top_p=0.95))
        batch = others[:pos] + [seeded] + others[pos:]
        out = sampler(torch.stack([b[0] for b in batch]), [b[1] for b in batch])
        got.append(out.token_ids[pos])
    return got


def test_seeded_row_independent_of_batch():
    torch.manual_seed(5)
    logits = torch.randn(64)
    alone = _seeded_run(7, logits, [], 0)
    assert len(set(alone)) > 1  # actually random
    others = [
        (torch.randn(64), row(temperature=1.0)),
        (torch.randn(64), row(temperature=0.0)),
        (torch.randn(64), row(temperature=1.3, top_k=5, output=[1, 2], frequency_penalty=1.0)),
        (torch.randn(64), row(Sampler().make_generator(8), seed=8, min_p=0.05)),
        (torch.randn(64), row(Sampler().make_generator(9), seed=9, temperature=0.7)),
    ]
    for pos in range(len(others) + 1):
        assert _seeded_run(7, logits, others, pos) == alone
    assert _seeded_run(7, logits, others[::-1], 2) == alone


def test_different_seeds_differ():
    torch.manual_seed(6)
    logits = torch.randn(1000) * 0.1
    assert _seeded_run(1, logits, [], 0, steps=20) != _seeded_run(2, logits, [], 0, steps=20)
    assert _seeded_run(1, logits, [], 0, steps=20) == _seeded_run(1, logits, [], 0, steps=20)


def test_shared_generator_seed_reproducible():
    torch.manual_seed(7)
    logits = torch.randn(4, 500)
    rows = [row(temperature=1.0) for _ in range(4)]
    assert Sampler(seed=11)(logits, rows).token_ids == Sampler(seed=11)(logits, rows).token_ids


def _check_logprob_dict(d: dict[int, float], sampled: int, k: int, raw_lp: torch.Tensor) -> None:
    keys = list(d)
    assert keys[0] == sampled
    top = raw_lp.topk(k).indices.tolist()
    assert keys[1:] == [t for t in top if t != sampled]
    assert len(d) == (k if sampled in top else k + 1)
    for t, v in d.items():
        assert isinstance(v, float)
        assert v == pytest.approx(raw_lp[t].item(), abs=1e-6)


def test_logprobs_from_raw_logits_and_ordering():
    torch.manual_seed(8)
    logits = (torch.randn(5, 200) * 3).to(torch.bfloat16)
    rows = [
        row(temperature=0.0, logprobs=3),                                      # sampled is top-1
        row(temperature=0.0, logprobs=1, banned=[int(logits[1].float().argmax())]),  # sampled is 2nd
        row(temperature=0.3, logprobs=5, output=[1, 2, 3], repetition_penalty=1.5, top_k=10),
        row(temperature=1.0, logprobs=0),
        row(temperature=1.0),
    ]
    out = Sampler()(logits, rows)
    raw_lp = torch.log_softmax(logits.float(), -1)
    for i, (r, tok) in enumerate(zip(rows, out.token_ids)):
        if r.params.logprobs is None:
            assert out.logprobs[i] is None
        else:
            _check_logprob_dict(out.logprobs[i], tok, r.params.logprobs, raw_lp[i])
    assert len(out.logprobs[0]) == 3 and len(out.logprobs[1]) == 2
    assert list(out.logprobs[3]) == [out.token_ids[3]]


def test_prompt_logprobs():
    torch.manual_seed(9)
    logits = torch.randn(6, 40)
    next_ids = [3, 7, 7, 0, 39, int(logits[5].argmax())]
    res = prompt_logprobs(logits, next_ids, 2)
    raw_lp = torch.log_softmax(logits, -1)
    assert len(res) == 6
    for t, d in enumerate(res):
        _check_logprob_dict(d, next_ids[t], 2, raw_lp[t])
    assert prompt_logprobs(logits, torch.tensor(next_ids), 0)[1] == {7: pytest.approx(raw_lp[1, 7].item())}
    total = sum(d[i] for d, i in zip(res, next_ids))
    assert math.isclose(total, raw_lp[torch.arange(6), next_ids].sum().item(), rel_tol=1e-5)


def test_sampler_state_round_trips_and_reads_older_checkpoints():
    logits = torch.randn(8, 300)
    rows = [row(temperature=1.0) for _ in range(8)] + [row(temperature=1.0, top_p=0.9) for _ in range(8)]
    logits = torch.cat([logits, logits])
    a = Sampler(seed=3)
    a(logits, rows)
    saved = a.get_state()
    want = a(logits, rows).token_ids
    b = Sampler(seed=99)
    b.set_state(saved)
    assert b(logits, rows).token_ids == want
    # Older checkpoints also carry a torch generator's state (alone, or beside the stream): the stream
    # is restored, the generator's state ignored.
    old = Sampler(seed=4)
    old.set_state({"generator": torch.Generator().manual_seed(5).get_state(), **saved})
    assert old(logits, rows).token_ids == want
    old.set_state(torch.Generator().manual_seed(5).get_state())
    assert len(old(logits, rows).token_ids) == len(rows)


def test_bf16_logits_sample_as_their_float32_widening():
    """Decode passes logits in the model's dtype; seeded draws, filters and penalties must give the
    tokens they give for the same values in float32."""
    torch.manual_seed(9)
    logits = (torch.randn(5, 400) * 2).bfloat16()
    kinds = [dict(temperature=0.9, seed=1), dict(temperature=1.2, top_p=0.8, seed=2),
             dict(temperature=1.0, top_k=20, min_p=0.01, seed=3),
             dict(temperature=0.7, frequency_penalty=0.5, repetition_penalty=1.3, seed=4),
             dict(temperature=0.0, presence_penalty=1.0)]

    def run(x: torch.Tensor) -> list[int]:
        sampler = Sampler(seed=0)
        rows = [row(sampler.make_generator(k["seed"]) if "seed" in k else None, prompt=[3, 4], output=[5, 3], **k)
                for k in kinds]
        return [t for _ in range(6) for t in sampler(x, rows).token_ids]

    before = logits.clone()
    got = run(logits)
    assert torch.equal(logits, before)     # the sampler worked on a copy
    assert got == run(logits.float())
    assert len(set(got[0::5])) > 1     # the seeded row really draws


def test_a_bitmask_goes_to_the_sampler_only_where_its_kernel_takes_it():
    # Without the fused kernel (CPU) the grammar's mask must be applied to the logits first; the
    # sampler says so and refuses a bitmask rather than sampling unmasked.
    sampler = Sampler(seed=0)
    rows = [row(None, temperature=1.0), row(None, temperature=0.0)]
    assert not sampler.fuses_bitmask(rows)
    with pytest.raises(ValueError, match="mask the logits"):
        sampler.sample_tensor(torch.randn(2, 64), rows, torch.zeros(2, 2, dtype=torch.int32))


def test_seeded_unfiltered_rows_draw_softmax_without_sorting():
    # On a CPU, seeded rows without filters take the inverse-CDF draw over the vocabulary order: each
    # token at its softmax probability, never a banned one, and a uniform that rounds up to the whole
    # mass still lands on the last token that has any.
    logits = CRAFTED.clone()
    logits = torch.cat([logits[:2], torch.tensor([float("-inf")]), logits[2:], torch.tensor([float("-inf")])])
    probs = torch.softmax(logits, -1)
    n = 6000
    sampler = Sampler(seed=0)
    rows = [row(sampler.make_generator(i), temperature=1.0) for i in range(n)]
    ids = torch.tensor(sampler(logits.expand(n, -1), rows).token_ids)
    counts = torch.bincount(ids, minlength=logits.numel()).float()
    assert counts[2] == 0 and counts[-1] == 0
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * sigma + 1e-6).all(), (counts / n, probs)

    class AlmostOne(random.Random):
        def random(self) -> float:
            return 1.0 - 1e-12
    edge = Sampler(seed=0)(logits.expand(3, -1), [row(AlmostOne(1), temperature=1.0)] * 3)
    assert edge.token_ids == [logits.numel() - 2] * 3


def test_cpu_filters_over_the_most_likely_tokens_match_the_full_sort():
    """On a CPU, top-k/top-p rows look at the most likely CPU_CANDIDATES tokens only when that gives
    the full sort's kept tokens and probabilities; a batch with a row whose prefix may run past them
    sorts."""
    from rlserve.engine import sampler as sm
    torch.manual_seed(12)
    V = 8 * sm.CPU_CANDIDATES
    cases = [dict(top_p=0.9), dict(top_p=0.5, top_k=300), dict(top_k=50), dict(top_p=0.95, temperature=0.7),
             dict(top_k=1000), dict(top_p=0.8)]
    params = [SamplingParams(**kw) for kw in cases]
    peaked = torch.randn(len(cases), V) * 4          # top-p 0.9 keeps a few hundred tokens
    probs = sm._temperature_probs(peaked, torch.tensor([p.temperature for p in params]))

    def kept(p: torch.Tensor, ids: torch.Tensor) -> dict[tuple[int, int], float]:
        return {(i, int(t)): float(x) for i in range(p.shape[0]) for t, x in zip(ids[i], p[i]) if x > 0}

    fast_probs, fast_ids, served = sm._filter_candidates(probs, params)
    assert served.all() and fast_probs.shape[1] == sm.CPU_CANDIDATES
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
    want = kept(sm._keep_prefix(sorted_probs, params, V), sorted_ids)
    got = kept(fast_probs, fast_ids)
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) <= 1e-7

    # A flat row's top-p 0.9 prefix runs past the candidates, as does a min-p row's: those two sort
    # their whole row, the others keep their candidates.
    flat = torch.randn(1, V) * 0.1
    both = torch.cat([peaked, flat, peaked[:1]])
    rows = [row(**kw) for kw in cases] + [row(top_p=0.9), row(min_p=0.01)]
    _, _, served = sm._filter_candidates(sm._temperature_probs(both, torch.tensor([r.params.temperature for r in rows])),
                                         [r.params for r in rows])
    assert served.tolist() == [True] * len(cases) + [False, False]
    p, ids = sm._filtered_sorted_probs(both, rows)
    assert p.shape[1] == V and (p[-2] > 0).sum() > sm.CPU_CANDIDATES
    assert kept(p[:len(cases)], ids[:len(cases)]).keys() == want.keys()

    # Same numbers, same tokens, whichever way the filters ran.
    fast_ids = Sampler(seed=3)(peaked, [row(random.Random(i), **kw) for i, kw in enumerate(cases)]).token_ids
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sm, "CPU_CANDIDATES", V)           # never fewer than the whole vocabulary: a full sort
        sorted_ids_drawn = Sampler(seed=3)(peaked, [row(random.Random(i), **kw)
                                                    for i, kw in enumerate(cases)]).token_ids
    assert fast_ids == sorted_ids_drawn


def test_a_tiny_repetition_penalty_still_samples_valid_tokens(tiny_model_dir):
    # 5e-324 is 0 in float32: dividing by it gave inf logits, NaN probabilities and an out-of-range id.
    from rlserve import LLM, SamplingParams

    llm = LLM(str(tiny_model_dir("tiny-llama")), max_total_tokens=512)
    vocab = llm.engine.model_config.vocab_size
    for penalty in (5e-324, 1e-30):
        for temperature in (1.0, 0.0, 0.05):
            out = llm.generate([[0, 5, 7]], SamplingParams(max_tokens=6, repetition_penalty=penalty, ignore_eos=True,
                                                            temperature=temperature, seed=1), use_tqdm=False)
            ids = out[0].outputs[0].token_ids
            assert len(ids) == 6 and all(0 <= t < vocab for t in ids)
