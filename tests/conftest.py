"""Shared fixtures: the default model, tiny random HF checkpoints, and a transformers greedy reference."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The benchmark scripts live in benchmarks/ at the repository root, outside the package: the root on
# sys.path lets tests import them as `benchmarks.<name>`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from rlserve.models.default import ensure_default_model
    return ensure_default_model()


def _make_tiny(preset: str, out: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from rlserve.models.presets import preset_hf_config

    cfg = preset_hf_config(preset)
    cfg.initializer_range = 0.1   # spread the logits so greedy choices are far from ties
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():         # norms and biases start at constants; make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The tokenizer the tiny checkpoints take: the default model's, or $RLSERVE_TEST_TOKENIZER_DIR (a
    directory of its tokenizer files, for a machine without the default model, e.g. a GPU host)."""
    env = os.environ.get("RLSERVE_TEST_TOKENIZER_DIR")
    if env:
        return Path(env)
    from rlserve.models.default import ensure_default_model
    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """Factory: a saved HF checkpoint (random weights) of a tiny preset, built once per session."""
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            made[preset] = _make_tiny(preset, tmp_path_factory.mktemp(preset), tokenizer_dir)
        return made[preset]
    return get


_HF_CACHE: dict[str, object] = {}


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM
    key = str(path)
    if key not in _HF_CACHE:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        m.generation_config.eos_token_id = None   # run to max_new_tokens like ignore_eos
        m.generation_config.pad_token_id = 0
        _HF_CACHE[key] = m
    return _HF_CACHE[key]


@torch.no_grad()
def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' own generate, one prompt at a time (no padding): tokens and their logprobs."""
    model = hf_model(path)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    lps = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]
    return tokens, lps
