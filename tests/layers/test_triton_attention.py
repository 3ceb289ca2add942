"""Triton attention vs the torch reference over the same KV pool: decode, extend, the KV store,
CUDA-graph replay of decode, and whole models (teacher-forced logits, greedy tokens)."""
from __future__ import annotations

import random
from unittest import mock

import pytest
import torch

from rlserve.kv_pool import KVPool
from rlserve.layers.attention.base import ForwardBatch
from rlserve.layers.attention.torch_backend import TorchAttentionBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
TOL = {torch.float32: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def triton_backend(pool: KVPool, scale: float, max_kv_splits: int | None = None):
    """The backend; with max_kv_splits, every decode batch it prepares gets that many spans instead of
    the count decode_kv_splits picks (as the attention benchmark's --splits times them)."""
    pytest.importorskip("triton")
    from rlserve.layers.attention import triton_decode
    from rlserve.layers.attention.triton_backend import TritonAttentionBackend
    backend = TritonAttentionBackend(pool, scale)
    if max_kv_splits is not None:
        prepare = backend.prepare

        def prepare_with_splits(batch: ForwardBatch) -> None:
            with mock.patch.object(triton_decode, "decode_kv_splits", lambda *_: max_kv_splits):
                prepare(batch)
        backend.prepare = prepare_with_splits
    return backend


# ---- random pools and batches --------------------------------------------------------------
class Case:
    """A pool with random K/V, sequences scattered over random slots, and new q/k/v to attend with."""

    def __init__(self, prefix_lens: list[int], extend_lens: list[int], heads: int, kv_heads: int,
                 dim: int, dtype: torch.dtype, device: str, seed: int, layers: int = 2) -> None:
        gen = torch.Generator().manual_seed(seed)
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        b, total, t = len(seq_lens), sum(seq_lens), sum(extend_lens)
        num_slots = total + 1 + 50                         # spare slots must stay untouched
        self.pool = KVPool(layers, num_slots, kv_heads, dim, dtype, device)
        for buf in self.pool.k_buffers + self.pool.v_buffers:
            buf.copy_(torch.randn(buf.shape, generator=gen))
        slots = torch.randperm(num_slots - 1, generator=gen)[:total] + 1
        rows = torch.randperm(b + 3, generator=gen)[:b]
        table = torch.zeros(b + 3, max(seq_lens) + 7, dtype=torch.int64)
        locs, positions, at = [], [], 0
        for i, (s, e) in enumerate(zip(seq_lens, extend_lens)):
            table[rows[i], :s] = slots[at:at + s]
            at += s
            locs.append(table[rows[i], s - e:s])
            positions.append(torch.arange(s - e, s))
        self.q = torch.randn(t, heads, dim, generator=gen).to(device, dtype)
        self.k = torch.randn(t, kv_heads, dim, generator=gen).to(device, dtype)
        self.v = torch.randn(t, kv_heads, dim, generator=gen).to(device, dtype)
        self.scale = dim ** -0.5
        self.batch = ForwardBatch(
            input_ids=torch.zeros(t, dtype=torch.int64, device=device),
            positions=torch.cat(positions).to(device),
            out_cache_loc=torch.cat(locs).to(device),
            req_rows=rows.to(device),
            seq_lens=torch.tensor(seq_lens, device=device),
            extend_lens=torch.tensor(extend_lens, device=device),
            seq_lens_cpu=seq_lens, extend_lens_cpu=list(extend_lens),
            is_decode=all(e == 1 for e in extend_lens) and t > 0,
            logits_indices=torch.cumsum(torch.tensor(extend_lens), 0).to(device) - 1,
            req_to_token=table.to(device),
        )

    def clone_pool(self) -> KVPool:
        p = self.pool
        out = KVPool(p.num_layers, p.num_slots, p.num_kv_heads, p.head_dim, p.dtype, p.k_buffers[0].device)
        for dst, src in zip(out.k_buffers + out.v_buffers, p.k_buffers + p.v_buffers):
            dst.copy_(src)
        return out

    def run(self, backend, layer: int = 1) -> torch.Tensor:
        backend.prepare(self.batch)
        return backend.forward(self.q, self.k, self.v, layer, self.batch)


def check_against_torch(case: Case, dtype: torch.dtype, layer: int = 1, **kwargs) -> None:
    ref_pool, tri_pool = case.clone_pool(), case.clone_pool()
    ref = case.run(TorchAttentionBackend(ref_pool, case.scale), layer)
    out = case.run(triton_backend(tri_pool, case.scale, **kwargs), layer)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    loc = case.batch.out_cache_loc
    assert torch.equal(tri_pool.k_buffers[layer][loc], case.k.to(tri_pool.dtype))
    assert torch.equal(tri_pool.v_buffers[layer][loc], case.v.to(tri_pool.dtype))
    for mine, theirs in zip(tri_pool.k_buffers + tri_pool.v_buffers, ref_pool.k_buffers + ref_pool.v_buffers):
        assert torch.equal(mine, theirs), "the store touched slots or layers it should not"


def decode_lens(rng: random.Random, n: int) -> list[int]:
    fixed = [1, 2, 63, 64, 65, 255, 256, 257, 1000, 4000]
    return fixed + [rng.randint(1, 4000) for _ in range(n - len(fixed))]


# ---- decode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_decode_matches_torch(ratio, dim, dtype):
    rng = random.Random(ratio * 1000 + dim)
    seq = decode_lens(rng, 16)
    rng.shuffle(seq)
    kv_heads = 2
    case = Case([s - 1 for s in seq], [1] * len(seq), kv_heads * ratio, kv_heads, dim, dtype, DEVICE,
                seed=ratio + dim)
    assert case.batch.is_decode
    check_against_torch(case, dtype)


@pytest.mark.parametrize("splits", [1, 3, 16])
@pytest.mark.parametrize("batch", [1, 7, 200])
def test_decode_split_counts(splits, batch):
    rng = random.Random(splits * 31 + batch)
    seq = [rng.randint(1, 3000) for _ in range(batch)]
    case = Case([s - 1 for s in seq], [1] * batch, 16, 8, 128, torch.bfloat16, DEVICE, seed=batch)
    check_against_torch(case, torch.bfloat16, max_kv_splits=splits)


def test_decode_fp16_and_auto_splits():
    seq = [4000, 1, 513, 2048]
    case = Case([s - 1 for s in seq], [1] * 4, 32, 4, 128, torch.float16, DEVICE, seed=5)
    check_against_torch(case, torch.float16)


def check_repeated_decode(case: Case, dtype: torch.dtype, **kwargs) -> None:
    """Every layer of a step, and the same layer again (as a benchmark or a graph replay calls it), runs
    decode with one backend: each call must match the reference. With the merge folded into the split
    kernel this checks that each call's span counters start from zero."""
    ref_backend = TorchAttentionBackend(case.clone_pool(), case.scale)
    backend = triton_backend(case.clone_pool(), case.scale, **kwargs)
    ref_backend.prepare(case.batch)
    backend.prepare(case.batch)
    for layer in (0, 1, 1, 0):
        want = ref_backend.forward(case.q, case.k, case.v, layer, case.batch)
        got = backend.forward(case.q, case.k, case.v, layer, case.batch)
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_repeated_decode_calls_match_torch():
    seq = [1, 300, 700, 2500, 64]
    case = Case([s - 1 for s in seq], [1] * len(seq), 8, 2, 64, torch.bfloat16, DEVICE, seed=11)
    check_repeated_decode(case, torch.bfloat16, max_kv_splits=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_a_climbing_running_max(dtype):
    """Scores that climb along each context move the running max past the rescale slack again and
    again (and stay within it in between, where rescaling is skipped): still the reference's result."""
    seq = [700, 2000, 64, 300]
    dim, kv_heads = 64, 2
    case = Case([s - 1 for s in seq], [1] * len(seq), 8, kv_heads, dim, dtype, DEVICE, seed=11)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    u = torch.randn(dim, device=DEVICE, generator=gen)
    u /= u.norm()
    for i, s in enumerate(seq):
        slots = case.batch.req_to_token[case.batch.req_rows[i], :s - 1]
        ramp = torch.linspace(0, 60, s - 1, device=DEVICE)       # q·k·scale climbs by ~60 along the context
        k = u * ramp[:, None] + 0.05 * torch.randn(s - 1, dim, device=DEVICE, generator=gen)
        case.pool.k_buffers[1][slots] = k[:, None, :].expand(-1, kv_heads, -1).to(dtype)
    case.q = (u * 8 + 0.1 * torch.randn(case.q.shape, device=DEVICE, generator=gen)).to(dtype)
    check_against_torch(case, dtype)


# ---- extend ---------------------------------------------------------------------------------
EXTEND_CASES = [  # (prefix lens, extend lens)
    ([0, 0, 0], [1, 37, 300]),
    ([100, 0, 513, 5, 1000, 64], [1, 200, 64, 130, 7, 65]),
    ([2000, 0], [129, 1]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("lens", range(len(EXTEND_CASES)))
def test_extend_matches_torch(lens, ratio, dim, dtype):
    prefix, ext = EXTEND_CASES[lens]
    case = Case(prefix, ext, 2 * ratio, 2, dim, dtype, DEVICE, seed=lens * 7 + ratio)
    assert not case.batch.is_decode
    check_against_torch(case, dtype)


def test_extend_single_tokens_not_decode():
    """A prefill step where every chunk is one token still takes the extend path."""
    case = Case([10, 0, 300], [1, 1, 1], 16, 8, 128, torch.bfloat16, DEVICE, seed=3)
    case.batch.is_decode = False
    check_against_torch(case, torch.bfloat16)


def test_extend_odd_head_dim_fp16():
    case = Case([33, 0], [70, 5], 12, 4, 80, torch.float16, DEVICE, seed=4)
    check_against_torch(case, torch.float16)


# ---- CUDA graphs ----------------------------------------------------------------------------
def test_decode_replays_in_cuda_graph():
    """Capture one decode layer, refill every input in place with a new batch of the same size,
    replay, and compare with the torch backend on the new batch."""
    b, heads, kv_heads, dim, dtype, max_len = 8, 16, 8, 128, torch.bfloat16, 4000
    num_slots = b * max_len + 1
    pool = KVPool(2, num_slots, kv_heads, dim, dtype, DEVICE)
    table = torch.zeros(b, max_len, dtype=torch.int64, device=DEVICE)
    q = torch.empty(b, heads, dim, dtype=dtype, device=DEVICE)
    k = torch.empty(b, kv_heads, dim, dtype=dtype, device=DEVICE)
    v = torch.empty_like(k)
    loc = torch.empty(b, dtype=torch.int64, device=DEVICE)
    seq_t = torch.empty(b, dtype=torch.int64, device=DEVICE)
    rows = torch.arange(b, device=DEVICE)

    def refill(seed: int) -> ForwardBatch:
        rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        seq = [rng.randint(1, max_len) for _ in range(b)]
        for buf in pool.k_buffers + pool.v_buffers:
            buf.copy_(torch.randn(buf.shape, generator=gen))
        slots = (torch.randperm(num_slots - 1, generator=gen) + 1).to(DEVICE)
        table.zero_()
        for i, s in enumerate(seq):
            table[i, :s] = slots[i * max_len:i * max_len + s]
        seq_t.copy_(torch.tensor(seq))
        loc.copy_(table[rows, seq_t - 1])
        for x in (q, k, v):
            x.copy_(torch.randn(x.shape, generator=gen))
        return ForwardBatch(input_ids=torch.zeros(b, dtype=torch.int64, device=DEVICE), positions=seq_t - 1,
                            out_cache_loc=loc, req_rows=rows, seq_lens=seq_t,
                            extend_lens=torch.ones(b, dtype=torch.int64, device=DEVICE),
                            seq_lens_cpu=seq, extend_lens_cpu=[1] * b, is_decode=True,
                            logits_indices=rows, req_to_token=table)

    batch = refill(1)
    backend = triton_backend(pool, dim ** -0.5)
    backend.prepare(batch)
    backend.forward(q, k, v, 1, batch)         # compile outside the capture
    backend.prepare(batch)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, 1, batch)

    batch = refill(2)
    ref_pool = KVPool(2, num_slots, kv_heads, dim, dtype, DEVICE)
    for dst, src in zip(ref_pool.k_buffers + ref_pool.v_buffers, pool.k_buffers + pool.v_buffers):
        dst.copy_(src)
    graph.replay()
    ref_backend = TorchAttentionBackend(ref_pool, dim ** -0.5)
    ref_backend.prepare(batch)
    ref = ref_backend.forward(q, k, v, 1, batch)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.equal(pool.k_buffers[1], ref_pool.k_buffers[1])


# ---- whole models ---------------------------------------------------------------------------
def small_config(head_dim: int):
    from rlserve.config import ModelConfig
    return ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=4096, hidden_size=256,
                       intermediate_size=512, num_layers=3, num_heads=8, num_kv_heads=2,
                       head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=1e6, max_position=4096,
                       tie_word_embeddings=True, qk_norm=True)


@torch.inference_mode()
def teacher_forced_logits(model, backend_name: str, seqs: list[list[int]], chunk: int,
                          decode_steps: int) -> torch.Tensor:
    """Prefill each sequence but its last `decode_steps` tokens in chunks of at most `chunk`, then
    decode the rest one token a step; the logits of every token, sequence after sequence."""
    cfg, device = model.config, torch.device(DEVICE)
    dtype = model.lm_head.weight.dtype
    total = sum(len(s) for s in seqs)
    pool = KVPool(cfg.num_layers, total + 1, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    scale = cfg.head_dim ** -0.5
    model.attn_backend = (TorchAttentionBackend(pool, scale) if backend_name == "torch"
                          else triton_backend(pool, scale))
    table = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.int64, device=device)
    slots = (torch.randperm(total, generator=torch.Generator().manual_seed(0)) + 1).to(device)
    at = 0
    for i, s in enumerate(seqs):
        table[i, :len(s)] = slots[at:at + len(s)]
        at += len(s)
    done = [0] * len(seqs)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]

    def step(take: dict[int, int], is_decode: bool) -> None:
        ids, pos, loc = [], [], []
        for i, n in take.items():
            ids += seqs[i][done[i]:done[i] + n]
            pos += range(done[i], done[i] + n)
            loc.append(table[i, done[i]:done[i] + n])
        seq_lens = [done[i] + n for i, n in take.items()]
        fb = ForwardBatch(
            input_ids=torch.tensor(ids, device=device), positions=torch.tensor(pos, device=device),
            out_cache_loc=torch.cat(loc), req_rows=torch.tensor(list(take), device=device),
            seq_lens=torch.tensor(seq_lens, device=device),
            extend_lens=torch.tensor(list(take.values()), device=device),
            seq_lens_cpu=seq_lens, extend_lens_cpu=list(take.values()), is_decode=is_decode,
            logits_indices=torch.arange(len(ids), device=device), req_to_token=table)
        model.attn_backend.prepare(fb)
        out = model.compute_logits(model(fb.input_ids, fb.positions, fb))
        at = 0
        for i, n in take.items():
            logits[i].append(out[at:at + n])
            at += n
            done[i] += n

    prefill = [len(s) - decode_steps for s in seqs]
    while any(d < p for d, p in zip(done, prefill)):
        step({i: min(chunk, p - d) for i, (d, p) in enumerate(zip(done, prefill)) if d < p}, False)
    for _ in range(decode_steps):
        step({i: 1 for i in range(len(seqs))}, True)
    return torch.cat([torch.cat(rows) for rows in logits])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_teacher_forced_logits(dtype, head_dim):
    """Logits of every token through prefill chunks over cached prefixes and decode steps. In bf16
    the two backends round differently, so each is measured against a float32 run instead: triton
    must be as close to it as the torch backend is."""
    import copy

    from rlserve.models.llama import LlamaForCausalLM

    pytest.importorskip("triton")
    cfg = small_config(head_dim)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg)
    model.init_dummy(0, std=0.1)     # spread the logits so argmax is far from ties
    model.eval()
    rng = random.Random(0)
    seqs = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in (9, 130, 700, 1500, 40)]
    run = dict(seqs=seqs, chunk=256, decode_steps=8)
    exact = teacher_forced_logits(model, "torch", **run)
    if dtype == torch.float32:
        out = teacher_forced_logits(model, "triton", **run)
        torch.testing.assert_close(out, exact, atol=2e-3, rtol=1e-3)
        assert (out.argmax(-1) == exact.argmax(-1)).float().mean().item() >= 0.999
        return
    low = copy.deepcopy(model).to(dtype)
    ref = teacher_forced_logits(low, "torch", **run)
    out = teacher_forced_logits(low, "triton", **run)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err_ref, err_out = (ref - exact).abs().mean().item(), (out - exact).abs().mean().item()
    assert err_out <= 1.25 * err_ref + 1e-3, f"triton {err_out:.4f} vs torch {err_ref:.4f} from float32"
    agree_ref = (ref.argmax(-1) == exact.argmax(-1)).float().mean().item()
    agree_out = (out.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agree_out >= agree_ref - 0.01, f"argmax agreement {agree_out:.4f} vs torch {agree_ref:.4f}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llm_triton_matches_torch(tmp_path, dtype):
    """The whole engine (chunked prefill, radix prefixes, decode) with either backend."""
    from transformers import AutoConfig

    from rlserve import LLM, SamplingParams
    from rlserve.models.presets import PRESETS

    pytest.importorskip("triton")
    kwargs = {**PRESETS["tiny-qwen3"], "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
              "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}
    AutoConfig.for_model(kwargs.pop("model_type"), **kwargs).save_pretrained(tmp_path)  # no weights, no tokenizer
    rng = random.Random(1)
    shared = [rng.randrange(10, 40000) for _ in range(300)]
    prompts = [[rng.randrange(10, 40000) for _ in range(n)] for n in (1, 5, 64, 257, 900, 1500)]
    prompts += [shared + [rng.randrange(10, 40000) for _ in range(n)] for n in (1, 30, 200)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=0)
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tmp_path), load_format="dummy", dtype=dtype, device=DEVICE,
                  attention_backend=backend, max_total_tokens=32768, chunked_prefill_size=512)
        llm.engine.model.init_dummy(0, std=0.1)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.kv_leaked() == 0
        # The first entry of each prompt-logprob dict is the prompt token's own logprob.
        results[backend] = [(o.outputs[0].token_ids, [next(iter(d.values())) for d in o.prompt_logprobs[1:]])
                            for o in outs]
        del llm
        torch.cuda.empty_cache()
    for (tok_ref, lp_ref), (tok, lp) in zip(results["torch"], results["triton"]):
        assert len(tok) == 24
        diff = max((abs(a - b) for a, b in zip(lp, lp_ref)), default=0.0)
        if dtype == "float32":
            assert tok == tok_ref
            assert diff < 1e-3
        else:
            assert diff < 0.5
