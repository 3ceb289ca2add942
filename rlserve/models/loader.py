"""Where a model's config, weights and tokenizer come from; building the module happens elsewhere."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from rlserve.config import ModelConfig
from rlserve.models.default import DEFAULT_GGUF_NAME, cache_dir, ensure_default_model, resolve_gguf
from rlserve.models.fp8_checkpoint import check_checkpoint_quantization, checkpoint_quant_config, dequantize_stream
from rlserve.models.presets import PRESETS, preset_hf_config

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class ModelSource:
    hf_config: PretrainedConfig
    model_dir: Path | None          # None for presets: there are no weights on disk
    load_format: str                # "safetensors" | "dummy"
    tokenizer_dir: Path | None
    gguf_file: Path | None = None   # the .gguf the directory was converted from (quantization=gguf reads it)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config)


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    """Turn a model argument (None, preset name, .gguf file or HF directory) into a ModelSource."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    if model is None:
        source = _from_dir(ensure_default_model(), load_format, "the default model")
        source.gguf_file = cache_dir() / "gguf" / DEFAULT_GGUF_NAME
        return source
    if model in PRESETS:
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"preset {model!r} has no weights; use load_format='dummy' (or 'auto')")
        # The tiny presets share SmolLM2's vocabulary, so its tokenizer can drive them.
        tokenizer = ensure_default_model() if model.startswith("tiny-") else None
        return ModelSource(preset_hf_config(model), None, "dummy", tokenizer)
    return _from_path(Path(model).expanduser(), load_format, model)


def _from_path(path: Path, load_format: str, name: str) -> ModelSource:
    if path.is_file() and path.suffix == ".gguf":
        source = _from_dir(resolve_gguf(path), load_format, name)
        source.gguf_file = path.resolve()
        return source
    if load_format == "gguf":
        raise ValueError(f"load_format='gguf' needs a .gguf file; got {name!r}")
    if path.is_dir() and (path / "config.json").is_file():
        return _from_dir(path, load_format, name)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory but has no config.json")
    raise FileNotFoundError(
        f"cannot find model {name!r}: it is not a preset ({', '.join(PRESETS)}), not a directory "
        f"with config.json and not a .gguf file. rlserve never downloads from the model hub; "
        f"pass a local path.")


def _from_dir(model_dir: Path, load_format: str, name: str) -> ModelSource:
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"cannot read the config of {name!r} ({model_dir / 'config.json'}): {e}") from e
    try:
        ModelConfig.from_hf(hf_config)
    except ValueError as e:
        raise ValueError(f"model {name!r}: {e}") from e
    check_checkpoint_quantization(checkpoint_quant_config(hf_config), name)
    if load_format != "dummy" and not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir} has no *.safetensors files (other weight formats are "
                                f"not supported); use load_format='dummy' for random weights")
    fmt = "dummy" if load_format == "dummy" else "safetensors"
    has_tokenizer = any((model_dir / f).is_file() for f in _TOKENIZER_FILES)
    return ModelSource(hf_config, model_dir, fmt, model_dir if has_tokenizer else None)


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every weight, one tensor in memory at a time; an FP8 checkpoint's weights
    come dequantized to float32 (models/fp8_checkpoint.py)."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    qc = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if qc is not None and qc.get("quant_method") == "fp8":
        return dequantize_stream(iter_stored_safetensors(model_dir), qc)
    return iter_stored_safetensors(model_dir)


def iter_stored_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor as stored, one in memory at a time."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_tokenizer(path: Path | str | None) -> Any:
    """A transformers tokenizer from a local directory; None gives None."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
