"""Named architecture presets: HF configs for dummy-weight benchmarks and tests.

Sizes follow the public configs of each model. Rope settings use the transformers v5 `rope_parameters`
layout, which carries rope_theta next to the scaling fields.
"""
from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


def _llama3_rope(theta: float, factor: float) -> dict[str, Any]:
    return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_QWEN3_COMMON: dict[str, Any] = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "bos_token_id": 151643, "eos_token_id": 151645,
}

_LLAMA3_COMMON: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    "bos_token_id": 128000, "eos_token_id": 128001,
}

# Tiny models share SmolLM2's vocabulary so the default model's tokenizer can drive them in tests.
_TINY_COMMON: dict[str, Any] = {
    "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": 1, "eos_token_id": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {**_QWEN3_COMMON, "hidden_size": 1024, "intermediate_size": 3072},
    "qwen3-1.7b": {**_QWEN3_COMMON, "hidden_size": 2048, "intermediate_size": 6144},
    "llama-3.2-1b": {**_LLAMA3_COMMON, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "head_dim": 64,
                     "tie_word_embeddings": True, "rope_parameters": _llama3_rope(500_000.0, 32.0)},
    "llama-3.1-8b": {**_LLAMA3_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "head_dim": 128,
                     "tie_word_embeddings": False, "rope_parameters": _llama3_rope(500_000.0, 8.0)},
    "tiny-llama": {**_TINY_COMMON, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                   "tie_word_embeddings": False},
    "tiny-qwen2": {**_TINY_COMMON, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                   "tie_word_embeddings": True},
    "tiny-qwen3": {**_TINY_COMMON, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                   "tie_word_embeddings": True},
}


def preset_hf_config(name: str) -> PretrainedConfig:
    """A fresh transformers config for the preset `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[name])
    kwargs["rope_parameters"] = dict(kwargs["rope_parameters"])  # callers may mutate the config
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
