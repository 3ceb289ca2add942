"""The decode GEMM benchmark times the products the engine runs: its per-layer shapes are those of the
model's stacked projections."""
from __future__ import annotations

import pytest
import torch

from benchmarks.decode_gemm import layer_shapes, main
from rlserve.config import ModelConfig
from rlserve.models.llama import LlamaForCausalLM
from rlserve.models.presets import preset_hf_config


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_layer_shapes_are_the_stacked_projections(name):
    model = LlamaForCausalLM(ModelConfig.from_hf(preset_hf_config(name)))
    model.stack_projections()
    layer = model.model.layers[0]
    engine = {"qkv": layer.self_attn.stacked.weight.shape, "o": layer.self_attn.o_proj.weight.shape,
              "gate_up": layer.mlp.stacked.weight.shape, "down": layer.mlp.down_proj.weight.shape}
    assert layer_shapes(name) == {k: tuple(v) for k, v in engine.items()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu():
    with pytest.raises(SystemExit, match="CUDA"):
        main(["--rows", "1"])
