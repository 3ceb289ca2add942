"""FP8 checkpoints in HF's layout (config.json quantization_config {"quant_method": "fp8"}, e4m3 weights
with `weight_scale` per tensor or per channel, or `weight_scale_inv` per block): on a CPU they load
dequantized, and the engine computes exactly what the float model built from the same dequantized
weights computes; an unknown quant_method fails at start."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlserve import LLM, SamplingParams
from rlserve.models.fp8_checkpoint import auto_quantization, dequantize_stream, expand_scale
from rlserve.models.loader import iter_safetensors

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
PROMPTS = [[5, 17, 300, 42, 9000, 11], [7, 7, 7, 1200], [100 + i for i in range(30)], [3, 1, 4, 1, 5, 9, 2, 6]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
# name: (scale tensor name, weight_block_size)
LAYOUTS = {"per-tensor": ("weight_scale", None), "per-channel": ("weight_scale", None),
           "block-128": ("weight_scale_inv", [128, 128]), "block-partial": ("weight_scale_inv", [24, 40])}


def _blocks(w: torch.Tensor, bo: int, bi: int) -> list[tuple[int, int, slice, slice]]:
    out, inp = w.shape
    return [(r, c, slice(r * bo, min(out, (r + 1) * bo)), slice(c * bi, min(inp, (c + 1) * bi)))
            for r in range(-(-out // bo)) for c in range(-(-inp // bi))]


def fp8_quantize(w: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 codes, stored scale, the float32 weight they stand for), the dequantized weight computed
    here block by block, independently of the loader."""
    w = w.float()
    if layout == "per-tensor":
        scale = w.abs().max().clamp(min=1e-12) / FP8_MAX
        codes = (w / scale).to(torch.float8_e4m3fn)
        return codes, scale.reshape(()), codes.float() * scale
    if layout == "per-channel":
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        codes = (w / scale).to(torch.float8_e4m3fn)
        return codes, scale, codes.float() * scale
    bo, bi = LAYOUTS[layout][1]  # type: ignore[misc]
    blocks = _blocks(w, bo, bi)
    scale = torch.zeros(-(-w.shape[0] // bo), -(-w.shape[1] // bi))
    codes = torch.zeros_like(w, dtype=torch.float8_e4m3fn)
    deq = torch.zeros_like(w)
    for r, c, rows, cols in blocks:
        s = w[rows, cols].abs().max().clamp(min=1e-12) / FP8_MAX
        scale[r, c] = s
        codes[rows, cols] = (w[rows, cols] / s).to(torch.float8_e4m3fn)
        deq[rows, cols] = codes[rows, cols].float() * s
    return codes, scale, deq


def write_fp8_checkpoint(src: Path, out: Path, layout: str, quant_method: str = "fp8") -> Path:
    """An FP8 copy of a float checkpoint (projections in e4m3, the rest float, as FP8 checkpoints are
    published) in `out`, and beside it (`out`-float) the float checkpoint of the dequantized weights."""
    scale_name, block = LAYOUTS[layout]
    state = load_file(str(src / "model.safetensors"))
    fp8, dequantized = {}, {}
    for name, tensor in state.items():
        if name.rsplit(".", 2)[-2] in PROJECTIONS:
            codes, scale, deq = fp8_quantize(tensor, layout)
            fp8[name], fp8[name.removesuffix("weight") + scale_name], dequantized[name] = codes, scale, deq
            if layout == "per-tensor":
                fp8[name.removesuffix("weight") + "input_scale"] = torch.tensor(1.0)   # static: dropped
        else:
            fp8[name] = dequantized[name] = tensor
    for path, tensors in ((out, fp8), (Path(f"{out}-float"), dequantized)):
        shutil.copytree(src, path)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    qc = {"quant_method": quant_method, "activation_scheme": "static" if layout == "per-tensor" else "dynamic"}
    if block is not None:
        qc["weight_block_size"] = block
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Path:
    return Path(tiny_model_dir("tiny-llama"))


def run(path: Path, **kw) -> tuple[list[list[int]], list[list[float]]]:
    llm = LLM(str(path), max_total_tokens=1024, **kw)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    return [o.token_ids for o in outs], [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_checkpoint_loads_dequantized_on_cpu(tiny, tmp_path, layout):
    fp8_dir = write_fp8_checkpoint(tiny, tmp_path / "fp8", layout)
    reference = load_file(str(Path(f"{fp8_dir}-float") / "model.safetensors"))
    loaded = dict(iter_safetensors(fp8_dir))
    assert set(loaded) == set(reference)                         # scales and input scales dropped
    for name, tensor in reference.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    float_model = load_file(str(tiny / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(loaded[name], float_model[name])     # the codes really are 8-bit
    tokens, logprobs = run(fp8_dir)
    assert (tokens, logprobs) == run(Path(f"{fp8_dir}-float"))  # exact: the same float weights


def test_scale_may_come_before_its_weight():
    w = torch.randn(32, 48)
    codes, scale, deq = fp8_quantize(w, "per-channel")
    stream = [("a.weight_scale", scale), ("b", torch.ones(3)), ("a.weight", codes)]
    got = dict(dequantize_stream(stream, {"quant_method": "fp8"}))
    assert set(got) == {"a.weight", "b"} and torch.equal(got["a.weight"], deq)
    with pytest.raises(ValueError, match="without a scale"):
        list(dequantize_stream([("a.weight", codes)], {"quant_method": "fp8"}))


def test_block_scale_shapes_are_checked():
    w = torch.zeros(64, 128)
    assert expand_scale(torch.ones(1, 1), w.shape, [128, 128]).shape == (64, 128)
    with pytest.raises(ValueError, match="does not fit"):
        expand_scale(torch.ones(2, 2), w.shape, [128, 128])
    with pytest.raises(ValueError, match="weight_block_size"):
        expand_scale(torch.ones(2, 2), w.shape, None)


def test_fp8_checkpoint_on_cpu_is_not_run_in_fp8():
    qc = {"quant_method": "fp8"}
    assert auto_quantization(None, qc, torch.device("cpu"), False) is None
    assert auto_quantization("int8", qc, torch.device("cpu"), False) == "int8"
    assert auto_quantization(None, None, torch.device("cpu"), False) is None


def test_fp8_checkpoint_under_int8_quantizes_the_dequantized_weights(tiny, tmp_path):
    fp8_dir = write_fp8_checkpoint(tiny, tmp_path / "fp8", "per-channel")
    assert run(fp8_dir, quantization="int8") == run(Path(f"{fp8_dir}-float"), quantization="int8")


@pytest.mark.parametrize("method", ["awq", "bitsandbytes"])
def test_unknown_quant_method_fails_at_start(tiny, tmp_path, method):
    bad = write_fp8_checkpoint(tiny, tmp_path / "bad", "per-channel", quant_method=method)
    with pytest.raises(ValueError, match=f"checkpoint quantization '{method}'.*not supported"):
        LLM(str(bad), max_total_tokens=1024)


@pytest.mark.parametrize("layout", ["per-channel", "per-tensor", "block-partial"])
def test_fp8_layers_take_the_stored_codes(tiny, tmp_path, layout):
    """What fp8 mode does on CUDA after the swap, run on the CPU (the layers only, no FP8 matmul): each
    Fp8Linear holds the stored e4m3 codes and per-channel scales; block-wise layers keep their own
    per-channel quantization of the dequantized weight."""
    from rlserve.layers.quantized import Fp8Linear
    from rlserve.models.fp8_checkpoint import keep_fp8_codes
    from rlserve.models.loader import iter_stored_safetensors
    from rlserve.models.quantize import quantize_model

    fp8_dir = write_fp8_checkpoint(tiny, tmp_path / "fp8", layout)
    model = LLM(str(fp8_dir), max_total_tokens=1024).engine.model
    quantize_model(model, "fp8", 32)
    before = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    kept = keep_fp8_codes(model, iter_stored_safetensors(fp8_dir))
    stored = load_file(str(fp8_dir / "model.safetensors"))
    assert len(before) == 14 and kept == (0 if layout.startswith("block") else 14)
    for name, module in model.named_modules():
        if not isinstance(module, Fp8Linear):
            continue
        if kept:
            assert torch.equal(module.qweight.view(torch.uint8), stored[f"{name}.weight"].view(torch.uint8))
            scale = stored[f"{name}.weight_scale"].float().reshape(-1).expand(module.out_features)
            assert torch.equal(module.weight_scale.reshape(-1), scale)
        else:
            assert torch.equal(module.qweight.view(torch.uint8), before[name].view(torch.uint8))
