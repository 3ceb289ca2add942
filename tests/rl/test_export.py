"""HF export: after a weight changes, the exported directory loads in transformers (same logits) and in
rlserve (same greedy tokens), and holds the changed weights, tied or not."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlserve import LLM, SamplingParams
from rlserve.rl.export import export_hf

PROMPT = [5, 17, 300, 42, 9000, 11]


def perturb(llm: LLM) -> dict[str, torch.Tensor]:
    """Change two weights (one of them the embedding, tied or not) as an update would; return originals."""
    model = llm.engine.model
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=gen) * 0.05)
    llm.engine.flush_cache()
    return before


def greedy(llm: LLM) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids


@torch.no_grad()
def our_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    model = llm.engine.model
    hidden = model(torch.tensor(ids), torch.arange(len(ids)))
    return model.compute_logits(hidden)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])   # untied, tied embeddings
def test_export_loads_in_transformers_and_rlserve(tiny_model_dir, tmp_path, preset):
    from transformers import AutoModelForCausalLM

    llm = LLM(str(tiny_model_dir(preset)))
    before = perturb(llm)
    tokens = greedy(llm)
    out = export_hf(llm, tmp_path / "export")

    # (c) the file holds the updated weights, not the source's; a tied head is not written twice
    saved = load_file(out / "model.safetensors")
    params = dict(llm.engine.model.named_parameters())
    assert set(saved) == set(params)
    tied = llm.engine.model_config.tie_word_embeddings
    assert ("lm_head.weight" in saved) == (not tied)
    for name, tensor in saved.items():
        assert torch.equal(tensor, params[name].detach()), name
    for name, old in before.items():
        assert not torch.equal(saved[name], old)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()

    # (a) transformers reads it and computes the same logits
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([PROMPT])).logits[0].float()
    assert (hf_logits - our_logits(llm, PROMPT)).abs().max().item() < 1e-4

    # (b) rlserve serves it with the same greedy tokens
    assert greedy(LLM(str(out))) == tokens


def test_export_casts_dtype(tiny_model_dir, tmp_path):
    llm = LLM(str(tiny_model_dir("tiny-qwen3")))
    out = export_hf(llm.engine, tmp_path / "bf16", dtype=torch.bfloat16)   # an Engine works too
    saved = load_file(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert LLM(str(out)).engine.model_config.num_layers == 2


def test_export_default_model(default_model_dir, tmp_path):
    """The default SmolLM2 (converted from GGUF): its config, tokenizer and chat template carry over."""
    from transformers import AutoConfig, AutoTokenizer

    llm = LLM(None, load_format="dummy", max_total_tokens=256)
    out = export_hf(llm, tmp_path / "smol", dtype=torch.bfloat16)
    src, got = AutoConfig.from_pretrained(default_model_dir), AutoConfig.from_pretrained(out)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings"):
        assert getattr(got, key) == getattr(src, key)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.encode("hello world") == llm.get_tokenizer().encode("hello world")
    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["model.norm.weight"].float(), llm.engine.model.model.norm.weight.detach())
