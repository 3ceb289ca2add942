"""FP8 checkpoints on the GPU (run with `-m gpu`, never in CI): under quantization=fp8, and when the
config alone asks for it, the Fp8Linear layers hold the checkpoint's own e4m3 codes and per-channel
scales (a per-tensor scale on every channel); block-wise scales are quantized per channel from the
dequantized weights; greedy tokens stay close to those of the float model of the same weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a CUDA device with FP8 tensor cores")]

from safetensors.torch import load_file  # noqa: E402

from rlserve import LLM  # noqa: E402
from rlserve.layers.quantized import Fp8Linear  # noqa: E402
from tests.engine.test_quantized_engine import PROMPTS, agreement, greedy  # noqa: E402
from tests.models.test_fp8_checkpoint import write_fp8_checkpoint  # noqa: E402

NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def _module(model, layer: int, name: str) -> Fp8Linear:
    part, proj = name.split(".")
    module = getattr(getattr(model.model.layers[layer], part), proj)
    assert isinstance(module, Fp8Linear)
    return module


@pytest.mark.parametrize("layout,asked", [("per-channel", "fp8"), ("per-tensor", "fp8"), ("per-channel", None)])
def test_fp8_layers_hold_the_stored_codes(tiny_model_dir, tmp_path, layout, asked):
    path = write_fp8_checkpoint(Path(tiny_model_dir("tiny-llama")), tmp_path / "fp8", layout)
    stored = load_file(str(path / "model.safetensors"))
    llm = LLM(str(path), dtype="bfloat16", quantization=asked, max_total_tokens=4096)
    model = llm.engine.model
    assert getattr(model, "quantization", None) == "fp8"        # None: chosen from the config
    for layer in range(2):
        for name in NAMES:
            module = _module(model, layer, name)
            key = f"model.layers.{layer}.{name}"
            codes = stored[f"{key}.weight"]
            assert torch.equal(module.qweight.cpu().view(torch.uint8), codes.view(torch.uint8)), key
            scale = stored[f"{key}.weight_scale"].float().reshape(-1).expand(module.out_features)
            assert torch.equal(module.weight_scale.cpu().reshape(-1), scale), key
    ref = LLM(str(path) + "-float", dtype="bfloat16", max_total_tokens=4096)
    assert agreement(greedy(llm), greedy(ref)) >= 0.5
    assert len(greedy(llm, PROMPTS[:1])[0]) > 0


def test_block_scales_are_requantized_per_channel(tiny_model_dir, tmp_path):
    path = write_fp8_checkpoint(Path(tiny_model_dir("tiny-llama")), tmp_path / "fp8", "block-partial")
    dequantized = load_file(str(Path(f"{path}-float") / "model.safetensors"))
    llm = LLM(str(path), dtype="bfloat16", quantization="fp8", max_total_tokens=4096)
    module = _module(llm.engine.model, 0, "mlp.down_proj")
    want = dequantized["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16).float()
    got = module.dequantized().float().cpu()
    assert ((got - want).norm() / want.norm()).item() < 0.06         # e4m3 per channel, over the block codes
