"""quantization="gguf": the default model's Q4_1 projections keep the file's 4-bit codes. Decoded, they
are gguf's own dequantization bit for bit; in the int4 layers they differ from it only by bfloat16's
rounding of the kernel's scale and zero; greedy tokens agree with the requantizing int4 path; tensors of
other types (the Q8_0 embedding, the F32 norms) are dequantized as without quantization; combinations
that cannot keep the codes fail at start."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from rlserve import LLM, SamplingParams
from rlserve.config import ModelConfig
from rlserve.layers.quantized import Int4Linear
from rlserve.models.gguf_quant import (
    _reader,
    check_gguf_quantization,
    gguf_affine,
    kept_int4,
    projection_tensors,
    read_kept,
)
from rlserve.models.loader import resolve_model
from rlserve.models.quantize import QuantizedStacked

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
           "Water boils at", "My favourite food is"]
BF16_REL = 2.0 ** -8                    # half a bfloat16 ulp, relative


@pytest.fixture(scope="module")
def source():
    src = resolve_model(None)
    assert src.gguf_file is not None and src.gguf_file.is_file()
    return src


@pytest.fixture(scope="module")
def cfg(source) -> ModelConfig:
    return ModelConfig.from_hf(source.hf_config)


def affine(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """d * q + m in float32, as gguf.quants computes it."""
    return d.repeat_interleave(32, 1) * q.float() + m.repeat_interleave(32, 1)


def test_decoded_blocks_are_ggufs_dequantization(source):
    reader = _reader(source.gguf_file)
    kinds = set()
    for _, tensor in projection_tensors(reader):
        q, d, m = gguf_affine(tensor)
        kinds.add(tensor.tensor_type.name)
        assert q.min() >= 0 and q.max() <= 15
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        assert torch.equal(affine(q, d, m), expected), tensor.name
    assert kinds == {"Q4_1"}


def test_q4_0_blocks_decode_too():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    tensor = SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=gguf.GGMLQuantizationType.Q4_0,
                             shape=np.array([64, 16]), data=data)
    q, d, m = gguf_affine(tensor)
    expected = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_0))
    assert torch.equal(affine(q, d, m), expected)


def random_q4_k(out: int, inp: int, seed: int) -> np.ndarray:
    """Q4_K super-blocks of random bytes (every 6-bit scale and min, every code) with finite float16
    d and dmin of either sign, as raw file bytes [out, inp / 256 * 144]."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(out, inp // 256, 144), dtype=np.uint8)
    blocks[..., 0:4] = (rng.standard_normal((out, inp // 256, 2)) * 0.01).astype(np.float16).view(np.uint8)
    return blocks.reshape(out, inp // 256 * 144)


def test_q4_k_blocks_decode_to_ggufs_dequantization():
    """Q4_K (256-weight super-blocks, 6-bit scales and mins per group of 32, packed across 12 bytes)
    decodes to gguf's dequantization bit for bit: every scale/min bit and both code nibbles are placed."""
    data = random_q4_k(32, 512, seed=1)
    tensor = SimpleNamespace(name="blk.0.ffn_down.weight", tensor_type=gguf.GGMLQuantizationType.Q4_K,
                             shape=np.array([512, 32]), data=data)
    q, d, m = gguf_affine(tensor)
    assert q.shape == (32, 512) and d.shape == m.shape == (32, 16)
    assert q.min() == 0 and q.max() == 15
    expected = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K))
    assert torch.equal(affine(q, d, m), expected)
    # Through the int4 kernel: the file's codes, scales and zeros rounded to bfloat16 only.
    layer = Int4Linear(torch.zeros(q.shape), None, 32)
    packed, scales_and_zeros = kept_int4(q, d, m)
    layer.packed.copy_(packed)
    layer.scales_and_zeros.copy_(scales_and_zeros)
    assert ((layer.dequantized().float() - expected).abs() <= _int4_bound(q, d, m)).all()


def test_rows_follow_the_converted_checkpoint(source, cfg):
    """llama.cpp's q/k row permutation is undone as transformers undoes it: the kept weights are the
    converted float checkpoint's, bit for bit."""
    from rlserve.models.loader import iter_safetensors

    kept = read_kept(source.gguf_file, cfg)
    converted = dict(iter_safetensors(source.model_dir))
    assert len(kept) == 7 * cfg.num_layers
    for name, (q, d, m) in kept.items():
        assert torch.equal(affine(q, d, m), converted[name]), name


def _int4_bound(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """bfloat16 rounding of scale and zero (half an ulp each) and of the kernel's bfloat16 output."""
    scale, zero = d.repeat_interleave(32, 1), (m + 8 * d).repeat_interleave(32, 1)
    return BF16_REL * ((q.float() - 8).abs() * scale.abs() + zero.abs() + affine(q, d, m).abs()) * 1.01


def test_kept_layer_dequantizes_to_the_files_weights(source, cfg):
    kept = read_kept(source.gguf_file, cfg)
    q, d, m = kept["model.layers.3.self_attn.q_proj.weight"]
    layer = Int4Linear(torch.zeros(q.shape), None, 32)
    packed, scales_and_zeros = kept_int4(q, d, m)
    layer.packed.copy_(packed)
    layer.scales_and_zeros.copy_(scales_and_zeros)
    got = layer.dequantized().float()
    # The kernel's weight is (q - 8) * scale + zero with scale and zero as stored (bfloat16), rounded once.
    s, z = (t.float().t().repeat_interleave(32, 1) for t in scales_and_zeros.unbind(-1))
    assert torch.equal(got, ((q.float() - 8) * s + z).to(torch.bfloat16).float())
    assert ((got - affine(q, d, m)).abs() <= _int4_bound(q, d, m)).all()


@pytest.fixture(scope="module")
def engines():
    gguf_llm = LLM(quantization="gguf", max_total_tokens=2048)
    int4_llm = LLM(quantization="int4", quantization_group_size=32, max_total_tokens=2048)
    return gguf_llm, int4_llm


def test_engine_holds_the_files_codes(engines, source, cfg):
    model = engines[0].engine.model
    kept = read_kept(source.gguf_file, cfg)
    for i in (0, cfg.num_layers - 1):
        layer = model.model.layers[i]
        assert isinstance(layer.self_attn.stacked, QuantizedStacked)     # fused as int4 is
        for part, name in (("self_attn", "k_proj"), ("mlp", "down_proj")):
            module = getattr(getattr(layer, part), name)
            assert isinstance(module, Int4Linear)
            q, d, m = kept[f"model.layers.{i}.{part}.{name}.weight"]
            got = module.dequantized().float()
            assert ((got - affine(q, d, m)).abs() <= _int4_bound(q, d, m)).all()


def test_other_types_are_dequantized(engines, source):
    """The Q8_0 embedding and the F32 norms come in as gguf dequantizes them."""
    tensors = {t.name: t for t in _reader(source.gguf_file).tensors}
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type.name == "Q8_0"
    model = engines[0].engine.model
    expected = torch.from_numpy(gguf.quants.dequantize(embd.data, embd.tensor_type))
    assert torch.equal(model.model.embed_tokens.weight, expected)
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type.name == "F32"
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.from_numpy(np.array(norm.data)))


def test_greedy_tokens_agree_with_the_requantizing_path(engines):
    from tests.engine.test_quantized_engine import agreement

    gguf_llm, int4_llm = engines
    kept = [o.outputs[0].token_ids for o in gguf_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    requantized = [o.outputs[0].token_ids for o in int4_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert agreement(kept, requantized) >= 0.75
    assert "Paris" in gguf_llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].text


def test_unsupported_combinations_fail_at_start(tiny_model_dir, source, cfg, tmp_path):
    with pytest.raises(ValueError, match="not a .gguf file"):
        LLM(str(tiny_model_dir("tiny-llama")), quantization="gguf", max_total_tokens=1024)
    with pytest.raises(ValueError, match="quantization_group_size must be 32"):
        LLM(quantization="gguf", quantization_group_size=64, max_total_tokens=1024)
    with pytest.raises(ValueError, match="on CUDA use quantization=fp8"):
        check_gguf_quantization(source.gguf_file, 32, cfg, torch.device("cuda"))
    # A projection of a type the int4 kernel cannot take as it is (Q8_0).
    path = tmp_path / "q8.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    data = gguf.quants.quantize(np.ones((64, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight .* is Q8_0"):
        check_gguf_quantization(Path(path), 32, cfg, torch.device("cpu"))


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    """A float [out, in] weight as Q4_K super-block bytes (a plain min/max encoder: per group of 32,
    scale = (max - min) / 15 and an offset of -min, both stored as 6-bit multiples of the super-block's
    d and dmin), so that a test file can hold K-quant projections."""
    out, inp = w.shape
    g = w.reshape(out, inp // 256, 8, 32).astype(np.float32)
    lo = np.minimum(g.min(-1), 0.0)
    scale = (g.max(-1) - lo) / 15
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (-lo.min(-1) / 63).astype(np.float16)
    sc = np.clip(np.rint(scale / np.maximum(d[..., None].astype(np.float32), 1e-12)), 1, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / np.maximum(dmin[..., None].astype(np.float32), 1e-12)), 0, 63).astype(np.uint8)
    step = d[..., None].astype(np.float32) * sc
    offset = dmin[..., None].astype(np.float32) * mn
    q = np.clip(np.rint((g + offset[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
    packed = np.zeros((out, inp // 256, 12), np.uint8)
    packed[..., 0:4] = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    codes = q.reshape(out, inp // 256, 4, 2, 32)
    nibbles = codes[..., 0, :] | (codes[..., 1, :] << 4)
    blocks = np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), packed,
                             nibbles.reshape(out, inp // 256, 128)], axis=-1)
    return blocks.reshape(out, -1)


def test_a_file_mixing_q4_1_and_q4_k_keeps_both(source, tmp_path, monkeypatch):
    """The default model's file with every ffn_down re-encoded as Q4_K (the one projection whose input
    width, 1536, holds whole 256-weight super-blocks), as in llama.cpp's mixed Q4_K_M files: it loads
    with quantization=gguf, each layer holds its own type's codes, and the model still answers."""
    reader = _reader(source.gguf_file)
    path = tmp_path / "mixed-q4_k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    re_encoded = {}
    for tensor in reader.tensors:
        if tensor.name.endswith("ffn_down.weight"):
            data = encode_q4_k(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
            re_encoded[tensor.name] = data
            writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setenv("RLSERVE_CACHE", str(tmp_path / "cache"))      # the conversion lands here

    llm = LLM(str(path), quantization="gguf", max_total_tokens=1024)
    layers = llm.engine.model.model.layers
    kinds = {t.name: t.tensor_type.name for t in _reader(path).tensors}
    assert kinds["blk.0.ffn_down.weight"] == "Q4_K" and kinds["blk.0.ffn_up.weight"] == "Q4_1"
    for i in (0, len(layers) - 1):
        data = re_encoded[f"blk.{i}.ffn_down.weight"]
        tensor = SimpleNamespace(name="down", tensor_type=gguf.GGMLQuantizationType.Q4_K,
                                 shape=np.array([data.shape[1] // 144 * 256, data.shape[0]]), data=data)
        q, d, m = gguf_affine(tensor)
        expected = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K))
        got = layers[i].mlp.down_proj.dequantized().float()
        assert ((got - expected).abs() <= _int4_bound(q, d, m)).all()
    out = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert "Paris" in out, out
