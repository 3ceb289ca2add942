"""The elementwise kernel set is each engine's own choice: an eager engine built after a compiled one in
the same process still runs the eager functions (they used to be swapped process-wide)."""
from __future__ import annotations

import pytest

from rlserve import LLM, SamplingParams
from rlserve.config import Elementwise
from rlserve.engine.build import resolve_elementwise
from rlserve.layers import fused
from rlserve.layers.fused import Kernels
from rlserve.models.llama import Attention, LlamaForCausalLM


def kernel_sets(model: LlamaForCausalLM) -> set[int]:
    """The ids of the kernel sets the model's layers hold."""
    layers = [m for m in model.modules() if hasattr(m, "kernels") and not isinstance(m, LlamaForCausalLM)]
    assert any(isinstance(m, Attention) for m in layers)
    return {id(m.kernels) for m in layers}


def test_two_engines_in_one_process_keep_their_own_kernels(monkeypatch):
    calls: list[str] = []

    def spy(self, *args):                              # counts compiled calls without paying for compilation
        calls.append(self.eager.__name__)
        return self.eager(*args)
    monkeypatch.setattr(fused._Fused, "__call__", spy)

    opts = dict(load_format="dummy", device="cpu", max_total_tokens=256)
    compiled = LLM("tiny-qwen3", compile="inductor", **opts)
    eager = LLM("tiny-qwen3", compile="eager", **opts)
    assert compiled.engine.model.kernels is Kernels.for_mode(Elementwise.INDUCTOR)
    assert eager.engine.model.kernels is fused.EAGER
    assert kernel_sets(compiled.engine.model) == {id(compiled.engine.model.kernels)}
    assert kernel_sets(eager.engine.model) == {id(fused.EAGER)}
    # the eager set holds plain functions (its rotary the rolled form, bit for bit apply_rotary)
    assert fused.EAGER.rms_norm is fused.rms_norm and fused.EAGER.qk_norm_rotary is fused.qk_norm_rotary_rolled

    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    want = eager.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert calls == []                                 # the eager engine never reached a compiled function
    got = compiled.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert {"rms_norm", "add_rms_norm", "silu_mul", "qk_norm_rotary"} <= set(calls)
    assert got == want                                 # same weights (same seed), same functions underneath


def test_kernel_sets_are_shared_per_mode_and_auto_is_resolved_per_device():
    assert Kernels.for_mode(Elementwise.INDUCTOR) is Kernels.for_mode(Elementwise.INDUCTOR)
    assert Kernels.for_mode(Elementwise.EAGER) is fused.EAGER
    with pytest.raises(ValueError, match="AUTO"):
        Kernels.for_mode(Elementwise.AUTO)
    import torch

    from rlserve.layers import triton_support
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_elementwise(Elementwise.AUTO, cpu) is Elementwise.EAGER
    for mode in (Elementwise.TRITON, Elementwise.INDUCTOR, Elementwise.EAGER):
        assert resolve_elementwise(mode, cpu) is mode and resolve_elementwise(mode, cuda) is mode
    expected = Elementwise.TRITON if triton_support.HAS_TRITON else Elementwise.INDUCTOR
    assert resolve_elementwise(Elementwise.AUTO, cuda) is expected


def test_a_model_built_alone_runs_eager_and_switches_sets_whole():
    from rlserve.config import ModelConfig
    from rlserve.models.presets import preset_hf_config
    model = LlamaForCausalLM(ModelConfig.from_hf(preset_hf_config("tiny-llama")))
    assert kernel_sets(model) == {id(fused.EAGER)}
    inductor = Kernels.for_mode(Elementwise.INDUCTOR)
    model.use_kernels(inductor)
    assert model.kernels is inductor and kernel_sets(model) == {id(inductor)}
