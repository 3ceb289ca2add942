"""Tiny pooling checkpoints, built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
from pooling_models import make_classifier, make_qwen2_rm


@pytest.fixture(scope="session")
def pooling_model_dir(tmp_path_factory, default_model_dir, tiny_model_dir):
    """Factory: "tiny-llama-cls" | "tiny-qwen2-rm" | any tiny preset (a causal LM run as an encoder)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            if name == "tiny-llama-cls":
                made[name] = make_classifier("tiny-llama", out, default_model_dir)
            elif name == "tiny-qwen2-rm":
                made[name] = make_qwen2_rm(out, default_model_dir)
            else:
                made[name] = tiny_model_dir(name)
        return made[name]
    return get
