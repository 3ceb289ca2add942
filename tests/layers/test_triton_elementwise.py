"""The Triton RMSNorm, activation and rotary kernels against float64 references of the math they promise (the
eager versions' deliberate casts included) and against the eager versions themselves.

On a CPU the kernels run under Triton's interpreter in a child process (TRITON_INTERPRET must be set
before any kernel is defined); on a GPU they run compiled, also inside a CUDA graph.
"""
from __future__ import annotations

import sys

import pytest
import torch
from triton_interpreter import run_under_triton_interpreter  # same folder

TOL = {torch.float32: 1e-5, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=tol,
                               atol=tol * max(ref.abs().max().item(), 1.0))


def _silu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g = gate.double()
    return g * torch.sigmoid(g) * up.double()


def _norm_ref(x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = x.dtype
    summed = x if delta is None else (x.double() + delta.double()).to(dtype)   # the eager add's rounding
    s = summed.double()
    return (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(dtype).double() * w.double(), summed


def _rotary_ref(x: torch.Tensor, w: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
                ) -> torch.Tensor:
    dtype = x.dtype
    x = x.double()
    if w is not None:   # rms_norm rounds the normalised row to the model dtype before the weight
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype).double() * w.double()
    c = cos.to(dtype).double().unsqueeze(1)    # apply_rotary rounds cos/sin to the model dtype
    s = sin.to(dtype).double().unsqueeze(1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]), -1)


def check_kernels(device: str) -> None:
    from rlserve.layers import fused
    from rlserve.layers import triton_elementwise as te
    from rlserve.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for t, cols in ((1, 5), (7, 300), (3, 1500)):
            # gate and up as the two halves of one stacked projection: strided rows, read in place
            stacked = (torch.randn(t, 2 * cols, generator=gen) * 3).to(dtype).to(device)
            gate, up = stacked[:, :cols], stacked[:, cols:]
            out = te.silu_mul(gate, up)
            assert out.shape == (t, cols) and out.dtype == dtype
            _close(out, _silu_ref(gate, up), dtype)
            _close(out, fused.silu_mul(gate.double(), up.double()), dtype)   # the eager version
        assert te.silu_mul(stacked[:0, :cols], stacked[:0, cols:]).shape == (0, cols)
        assert te.silu_mul_supported(gate, up) and not te.silu_mul_supported(gate, up.float() if dtype != torch.float32
                                                                              else up.double())
        with pytest.raises(ValueError):
            te.silu_mul(stacked[:, :cols], stacked[:, : cols - 1])

        for shape in ((5, 1024), (2, 3, 576), (1, 3000)):
            x = (torch.randn(*shape, generator=gen) * 4).to(dtype).to(device)
            delta = torch.randn(*shape, generator=gen).to(dtype).to(device)
            w = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype).to(device)
            want, _ = _norm_ref(x, None, w, 1e-6)
            _close(te.rms_norm(x, w, 1e-6), want, dtype)
            _close(te.rms_norm(x, w, 1e-6), fused.rms_norm(x.double(), w.double(), 1e-6), dtype)
            normed, summed = te.add_rms_norm(x, delta, w, 1e-6)
            want, want_sum = _norm_ref(x, delta, w, 1e-6)
            assert summed.dtype == dtype
            if device != "cpu" or dtype == torch.float32:   # the residual stream, bit for bit
                assert torch.equal(summed, want_sum)
            else:   # Triton's interpreter narrows float32 to 16 bits by truncation, GPUs to nearest
                _close(summed, want_sum, dtype)
            _close(normed, want, dtype)
        strided = x.t()   # rows that aren't contiguous are copied first
        torch.testing.assert_close(te.rms_norm(strided, x.new_ones(strided.shape[-1]), 1e-6),
                                   fused.rms_norm(strided, x.new_ones(strided.shape[-1]), 1e-6),
                                   rtol=TOL[dtype], atol=TOL[dtype] * 8)
        assert te.norm_supported(x, w) and not te.norm_supported(x, w.double())
        assert te.add_norm_supported(x, delta, w) and not te.add_norm_supported(x, delta.double(), w)
        with pytest.raises(ValueError):
            te.rms_norm(x, w[:-1], 1e-6)
        assert te.rms_norm(x[:0], w, 1e-6).shape == (0, x.shape[-1])

        for heads, kv_heads, dim in ((16, 8, 128), (3, 1, 64), (2, 2, 8)):
            t = 6
            qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype).to(device)
            q = qkv[:, : heads * dim].view(t, heads, dim)
            k = qkv[:, heads * dim: (heads + kv_heads) * dim].view(t, kv_heads, dim)
            rope = RotaryEmbedding(dim, 8192, 1e6, None).to(device)
            cos, sin = rope.cos_sin(torch.tensor([0, 1, 5, 100, 4000, 8191], device=device))
            qw = (torch.rand(dim, generator=gen) + 0.5).to(dtype).to(device)
            kw = (torch.rand(dim, generator=gen) + 0.5).to(dtype).to(device)
            nq, nk = te.qk_norm_rotary(q, k, qw, kw, 1e-6, cos, sin)
            _close(nq, _rotary_ref(q, qw, 1e-6, cos, sin), dtype)
            _close(nk, _rotary_ref(k, kw, 1e-6, cos, sin), dtype)
            pq, pk = te.apply_rotary(q, k, cos, sin)
            _close(pq, _rotary_ref(q, None, 0.0, cos, sin), dtype)
            _close(pk, _rotary_ref(k, None, 0.0, cos, sin), dtype)
            if dtype == torch.float32:   # the eager versions round nothing in float32: the same values
                for new, old in zip((nq, nk, pq, pk), fused.qk_norm_rotary(q, k, qw, kw, 1e-6, cos, sin)
                                    + fused.apply_rotary(q, k, cos, sin)):
                    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
        assert te.rotary_supported(q, k) and not te.rotary_supported(torch.empty(1, 1, 96), torch.empty(1, 1, 96))
        assert te.qk_norm_rotary_supported(q, k, qw, kw) and not te.qk_norm_rotary_supported(q, k, qw.double(), kw)
        with pytest.raises(ValueError):
            te.apply_rotary(q, k[:, :, : dim // 2], cos, sin)


def check_model_forward() -> None:
    """Whole tiny models (q/k norm and plain rotary, stacked projections) running a kernel set of the
    Triton kernels alone, as compile="triton" runs them for CUDA inputs: the same hidden states as the
    eager functions, in float32 and bfloat16."""
    from rlserve import LLM
    from rlserve.config import Elementwise
    from rlserve.layers import triton_elementwise as te
    from rlserve.layers.fused import EAGER, Kernels

    triton_only = Kernels(Elementwise.TRITON, te.rms_norm, te.add_rms_norm, te.silu_mul, te.apply_rotary,
                          te.qk_norm_rotary)
    gen = torch.Generator().manual_seed(1)
    for preset in ("tiny-qwen3", "tiny-llama"):
        for dtype, tol in (("float32", 1e-4), ("bfloat16", 6e-2)):
            model = LLM(preset, load_format="dummy", device="cpu", dtype=dtype, compile="eager",
                        max_total_tokens=256).engine.model
            assert all(layer.mlp.stacked is not None for layer in model.model.layers)
            lens = [7, 12]
            ids = torch.randint(0, model.model.embed_tokens.num_embeddings, (sum(lens),), generator=gen)
            positions = torch.cat([torch.arange(n) for n in lens])
            with torch.no_grad():
                want = model(ids, positions, cu_seqlens=[0, lens[0], sum(lens)]).float()
                model.use_kernels(triton_only)
                got = model(ids, positions, cu_seqlens=[0, lens[0], sum(lens)]).float()
                model.use_kernels(EAGER)
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= tol * max(scale, 1.0), (preset, dtype)


@pytest.mark.parametrize("what", ["cpu", "model"])
def test_kernels_under_the_triton_interpreter_match_the_references(what):
    assert "kernels ok" in run_under_triton_interpreter(__file__, what)


def test_the_cli_flags_pick_the_elementwise_kernels_and_exclude_each_other(capsys):
    import argparse

    from rlserve.config import Elementwise
    from rlserve.config_args import add_engine_args, engine_config_from_args, engine_options_from_args
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert "compile" not in engine_options_from_args(parser.parse_args(["--device", "cpu"]))
    for flag, mode in (("--triton-elementwise", Elementwise.TRITON), ("--inductor-elementwise", Elementwise.INDUCTOR),
                       ("--disable-compile", Elementwise.EAGER)):
        assert engine_config_from_args(parser.parse_args(["--device", "cpu", flag])).compile is mode
    for pair in (["--triton-elementwise", "--disable-compile"], ["--inductor-elementwise", "--disable-compile"],
                 ["--triton-elementwise", "--inductor-elementwise"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--device", "cpu", *pair])
        assert "exclude each other" in capsys.readouterr().err


def test_auto_means_triton_kernels_on_cuda_and_eager_on_cpu(monkeypatch):
    from rlserve.config import Elementwise
    from rlserve.engine.build import resolve_elementwise
    from rlserve.layers import triton_support

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_elementwise(Elementwise.AUTO, cpu) is Elementwise.EAGER
    monkeypatch.setattr(triton_support, "HAS_TRITON", True)
    assert resolve_elementwise(Elementwise.AUTO, cuda) is Elementwise.TRITON
    monkeypatch.setattr(triton_support, "HAS_TRITON", False)
    # torch.compile where Triton kernels can't run
    assert resolve_elementwise(Elementwise.AUTO, cuda) is Elementwise.INDUCTOR
    for explicit in (Elementwise.INDUCTOR, Elementwise.EAGER, Elementwise.TRITON):
        assert resolve_elementwise(explicit, cuda) is explicit and resolve_elementwise(explicit, cpu) is explicit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_the_gpu_match_the_references():
    check_kernels("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_replay_in_a_cuda_graph_and_serve_the_compiled_model_functions():
    from rlserve.config import Elementwise
    from rlserve.layers import triton_elementwise as te
    from rlserve.layers.fused import Kernels
    kernels = Kernels.for_mode(Elementwise.TRITON)
    x = torch.randn(64, 2 * 3072, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(64, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(64, 8, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(128, device="cuda", dtype=torch.bfloat16) + 0.5
    cos, sin = torch.rand(64, 128, device="cuda"), torch.rand(64, 128, device="cuda")
    h = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    hw = torch.rand(1024, device="cuda", dtype=torch.bfloat16) + 0.5
    with torch.inference_mode():
        want = (kernels.silu_mul(x[:, :3072], x[:, 3072:]), *kernels.qk_norm_rotary(q, k, w, w, 1e-6, cos, sin),
                kernels.rms_norm(h, hw, 1e-6), *kernels.add_rms_norm(h, x[:, :1024], hw, 1e-6))
        direct = (te.silu_mul(x[:, :3072], x[:, 3072:]), *te.qk_norm_rotary(q, k, w, w, 1e-6, cos, sin),
                  te.rms_norm(h, hw, 1e-6), *te.add_rms_norm(h, x[:, :1024], hw, 1e-6))
        for a, b in zip(want, direct):   # with compile="triton" the model's functions are these kernels
            assert torch.equal(a, b)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = (te.silu_mul(x[:, :3072], x[:, 3072:]), *te.qk_norm_rotary(q, k, w, w, 1e-6, cos, sin),
                   *te.add_rms_norm(h, x[:, :1024], hw, 1e-6))
        for t in (x, q, k, h):
            t.normal_()
        graph.replay()
        want = (te.silu_mul(x[:, :3072], x[:, 3072:]), *te.qk_norm_rotary(q, k, w, w, 1e-6, cos, sin),
                *te.add_rms_norm(h, x[:, :1024], hw, 1e-6))
        for a, b in zip(got, want):
            assert torch.equal(a, b)


if __name__ == "__main__":   # the child process of the interpreter test
    check_model_forward() if sys.argv[1] == "model" else check_kernels(sys.argv[1])
    print("kernels ok")
