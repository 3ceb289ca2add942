"""GPU kernels added for the decode fast path: the fp8 (e4m3, per-token-and-head scales) KV pool in
the triton attention backend against the torch reference reading the same pool, and the fused
Gumbel-max sampling kernel against the distribution it must draw from."""
from __future__ import annotations

import pytest
import torch

from rlserve.kv_pool import FP8_DTYPE, KVPool, quantize_fp8
from rlserve.layers.attention.torch_backend import TorchAttentionBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from test_gumbel_interpreted import pack_bitmask  # noqa: E402  (same folder)
from test_triton_attention import Case, triton_backend  # noqa: E402  (same folder)


def fp8_case(prefix_lens, extend_lens, heads=16, kv_heads=8, dim=128, seed=0, dtype=torch.bfloat16,
             device="cuda") -> Case:
    """A Case whose pool is its random pool quantised to fp8 (K scaled by 3, V by 0.01: their scales
    differ ~300×), scales included; q/k/v stay in `dtype`."""
    case = Case(prefix_lens, extend_lens, heads, kv_heads, dim, dtype, device, seed)
    src = case.pool
    pool = KVPool(src.num_layers, src.num_slots, kv_heads, dim, FP8_DTYPE, device)
    every = torch.arange(src.num_slots, device=device)
    for layer in range(src.num_layers):
        pool.store(layer, every, src.k_buffers[layer] * 3, src.v_buffers[layer] * 0.01)
    case.pool = pool
    return case


def copy_pool(p: KVPool) -> KVPool:
    out = KVPool(p.num_layers, p.num_slots, p.num_kv_heads, p.head_dim, p.dtype, p.k_buffers[0].device)
    for dst, src in zip(out.k_buffers + out.v_buffers + out.k_scales + out.v_scales,
                        p.k_buffers + p.v_buffers + p.k_scales + p.v_scales):
        dst.copy_(src)
    return out


def test_quantize_roundtrip_keeps_small_and_large_heads():
    x = torch.randn(64, 8, 128, device="cuda")
    x[:, 0] *= 1e-4          # a head of tiny values must not flush to zero
    x[:, 1] *= 1e3           # nor a large one saturate
    q, s = quantize_fp8(x)
    back = q.float() * s[..., None]
    rel = (back - x).abs().amax(-1) / x.abs().amax(-1)
    assert rel.max().item() < 0.07           # e4m3 keeps 3 mantissa bits: ≤ 1/16 of the head's max


def test_triton_store_matches_torch_quantisation():
    case = fp8_case([5, 40], [3, 7])
    ref = KVPool(2, case.pool.num_slots, 8, 128, FP8_DTYPE, "cuda")
    got = KVPool(2, case.pool.num_slots, 8, 128, FP8_DTYPE, "cuda")
    from rlserve.layers.attention.triton_backend import store_kv
    loc = case.batch.out_cache_loc
    ref.store(1, loc, case.k, case.v)
    store_kv(got.k_buffers[1], got.v_buffers[1], loc, case.k, case.v, got.k_scales[1], got.v_scales[1])
    torch.testing.assert_close(got.k_scales[1], ref.k_scales[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(got.v_scales[1], ref.v_scales[1], rtol=1e-6, atol=0)
    k_ref, v_ref = ref.load(1, loc, torch.float32)
    k_got, v_got = got.load(1, loc, torch.float32)
    # Division may round differently by one fp8 step: within 1/8 of each head's max.
    assert ((k_got - k_ref).abs().amax(-1) <= ref.k_scales[1][loc] * 448 / 8).all()
    assert ((v_got - v_ref).abs().amax(-1) <= ref.v_scales[1][loc] * 448 / 8).all()


@pytest.mark.parametrize("prefix", [[37, 300, 1200, 5], [900] * 8])
def test_fp8_decode_matches_torch_reference(prefix):
    case = fp8_case(prefix, [1] * len(prefix))
    pool_copy = copy_pool(case.pool)
    ref = case.run(TorchAttentionBackend(pool_copy, case.scale))
    out = case.run(triton_backend(case.pool, case.scale))
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_fp8_extend_close_to_torch_reference():
    case = fp8_case([0, 64, 333], [50, 17, 128])
    pool_copy = copy_pool(case.pool)
    ref = case.run(TorchAttentionBackend(pool_copy, case.scale)).float()
    out = case.run(triton_backend(case.pool, case.scale)).float()
    # The triton kernel attends to the new tokens' own K/V unquantised, the reference reads them back
    # from the fp8 pool: they differ by the quantisation error, not more.
    assert (out - ref).abs().mean().item() < 0.02 * ref.abs().mean().item() + 1e-3
    assert (out - ref).abs().max().item() < 0.25 * ref.abs().max().item()


# ---- Gumbel-max sampling ---------------------------------------------------------------------
def test_gumbel_kernel_draws_softmax_distribution():
    from rlserve.layers.gumbel import gumbel_argmax
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2], device="cuda")
    rows, temp = 20000, 0.8
    batch = logits.repeat(rows, 1).to(torch.bfloat16)
    ids = gumbel_argmax(batch, torch.full((rows,), temp, device="cuda"), torch.arange(rows, device="cuda") + 1234)
    freq = torch.bincount(ids, minlength=8).float() / rows
    p = torch.softmax(batch[0].float() / temp, -1)
    sigma = (p * (1 - p) / rows).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-4).all(), (freq, p)


def test_gumbel_kernel_greedy_rows_seeds_and_odd_vocab():
    from rlserve.layers.gumbel import gumbel_argmax
    vocab = 151_936 + 37                      # not a multiple of the block
    logits = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16)
    temps = torch.full((64,), 1.0, device="cuda")
    temps[::2] = 0.0                          # greedy rows share the launch
    seeds = torch.arange(64, device="cuda")
    a = gumbel_argmax(logits, temps, seeds + 7)
    b = gumbel_argmax(logits, temps, seeds + 7)
    c = gumbel_argmax(logits, temps, seeds + 1000)
    assert torch.equal(a, b)
    assert torch.equal(a[::2], logits[::2].float().argmax(-1))
    assert not torch.equal(a[1::2], c[1::2])
    assert ((a >= 0) & (a < vocab)).all()


def test_gumbel_kernel_bitmask_draws_as_if_masked_logits():
    # The bitmask inside the kernel must give the very draw of logits masked to -inf beforehand (same
    # seeds, same uniforms), for sampled and greedy rows, sparse and full masks, a vocab not a
    # multiple of 32; and it rejects a mask that doesn't cover the logits.
    import xgrammar as xgr

    from rlserve.layers.gumbel import gumbel_argmax
    rows, vocab = 48, 49_152 + 17
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    temps = torch.full((rows,), 1.0, device="cuda")
    temps[::3] = 0.0
    seeds = torch.arange(rows, device="cuda") + 11
    gen = torch.Generator().manual_seed(0)
    allowed = torch.rand(rows, vocab, generator=gen) < torch.linspace(0.001, 0.5, rows)[:, None]
    allowed[-4:] = True                                           # unconstrained rows: every bit set
    allowed[:, vocab - 1] |= torch.arange(rows) % 5 == 0          # the last token reachable in some rows
    bitmask = pack_bitmask(allowed).cuda()
    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask, vocab_size=vocab)
    assert torch.equal(masked.isfinite().cpu(), allowed)          # the packing matches xgrammar's
    for s in (0, 1000):
        got = gumbel_argmax(logits, temps, seeds + s, bitmask)
        assert torch.equal(got, gumbel_argmax(masked, temps, seeds + s))
        assert allowed[torch.arange(rows), got.cpu()].all()
    with pytest.raises(ValueError, match="does not cover"):
        gumbel_argmax(logits, temps, seeds, bitmask[:, :-1])


def test_engine_fp8_kv_runs_and_frees_everything():
    from rlserve import LLM, SamplingParams
    llm = LLM("qwen3-0.6b", kv_cache_dtype="fp8_e4m3", max_total_tokens=60_000, cuda_graph_max_bs=16)
    assert llm.engine.status().kv_dtype == str(FP8_DTYPE).removeprefix("torch.")
    outs = llm.generate([[i + 1] * (50 + 30 * i) for i in range(24)],
                        SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert llm.engine.kv_leaked() == 0
    assert torch.isfinite(llm.engine.kv_pool.k_scales[0]).all()


def test_gumbel_kernel_small_batch_splits_the_vocabulary_without_bias():
    # Batch 2 cuts each row into many chunks; two equal winners in far-apart chunks must each be
    # drawn about half the time, and a greedy row must still find the one maximum in its last chunk.
    from rlserve.layers.gumbel import gumbel_argmax, gumbel_parts
    vocab = 151_936
    assert gumbel_parts(2, vocab) > 8
    draws = []
    for seed in range(400):
        logits = torch.full((2, vocab), -30.0, device="cuda")
        logits[0, [5, vocab - 3]] = 1.0
        logits[1, vocab - 1] = 0.5
        ids = gumbel_argmax(logits, torch.tensor([1.0, 0.0], device="cuda"), torch.tensor([seed, 0], device="cuda"))
        assert ids[1].item() == vocab - 1
        draws.append(ids[0].item())
    late = sum(d == vocab - 3 for d in draws) / len(draws)
    assert set(draws) <= {5, vocab - 3}
    assert 0.4 < late < 0.6, late


def test_seeded_rows_draw_in_the_kernel_independently_of_the_batch():
    """A seeded row keys the Gumbel kernel with its own stream: its tokens are the same alone, in a
    large batch (other chunking of the vocabulary) and beside a top-p row (the unfused path)."""
    from rlserve.engine.sampler import Sampler, SampleRow
    from rlserve.sampling import SamplingParams
    torch.manual_seed(3)
    vocab = 151_936
    logits = torch.randn(vocab, device="cuda")

    def run(others: list, pos: int, steps: int = 8) -> list[int]:
        sampler = Sampler(seed=5, device="cuda")
        stream = sampler.make_generator(7)
        got = []
        for _ in range(steps):
            me = (logits, SampleRow(SamplingParams(temperature=1.0, seed=7), stream))
            batch = others[:pos] + [me] + others[pos:]
            got.append(sampler(torch.stack([b[0] for b in batch]), [b[1] for b in batch]).token_ids[pos])
        return got

    alone = run([], 0)
    assert len(set(alone)) > 1
    others = [(torch.randn(vocab, device="cuda"), SampleRow(SamplingParams(temperature=1.0), None))
              for _ in range(40)]
    top_p = (torch.randn(vocab, device="cuda"), SampleRow(SamplingParams(temperature=1.0, top_p=0.9), None))
    assert run(others, 17) == alone
    assert run(others[:3] + [top_p], 2) == alone


def test_sampler_draws_the_same_tokens_from_bf16_logits_as_from_their_float32_widening():
    """Decode hands the sampler the model's bf16 logits; every path must pick what it picks from the
    same values in float32: greedy, the Gumbel kernel (seeded and not) and the sorted top-p path."""
    from rlserve.engine.sampler import Sampler, SampleRow
    from rlserve.sampling import SamplingParams
    torch.manual_seed(4)
    logits = (torch.randn(24, 151_936, device="cuda") * 3).bfloat16()
    kinds = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, seed=11),
             dict(temperature=1.0, top_p=0.9, seed=12)]

    def run(x: torch.Tensor) -> list[int]:
        sampler = Sampler(seed=5, device="cuda")
        rows = [SampleRow(SamplingParams(**kinds[i % 4]),
                          sampler.make_generator(kinds[i % 4]["seed"] + i) if "seed" in kinds[i % 4] else None)
                for i in range(len(x))]
        return [t for _ in range(3) for t in sampler(x, rows).token_ids]

    got = run(logits)
    assert got == run(logits.float())
    assert len(set(got)) > 24   # the random rows drew different tokens from one draw to the next
