"""Export the policy as an ordinary HF model directory (config.json, safetensors, tokenizer) that both
`transformers.AutoModelForCausalLM.from_pretrained` and `rlserve serve` load.

Our module already uses HF parameter names, so the export is the live state dict written as is: no
renaming, no conversion. Tied embeddings are written once (as HF does: no lm_head.weight).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlserve.models.loader import resolve_model

if TYPE_CHECKING:
    from rlserve.engine.engine import Engine
    from rlserve.llm import LLM

MAX_SHARD_SIZE = "5GB"    # HF's default: one model.safetensors below it, an indexed set of shards above


def export_hf(llm: LLM | Engine, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the engine's current weights (e.g. the trainer's, after updates) as a HF model directory.

    dtype: cast the weights on the way out (e.g. torch.bfloat16); None keeps the model's own dtype.
    The HF config is the source model's (the directory, .gguf or preset the engine was built from)."""
    from huggingface_hub import save_torch_state_dict

    engine: Engine = llm.engine if hasattr(llm, "engine") else llm   # an LLM or its engine
    model = engine.model
    if any(p.numel() == 0 for p in model.parameters()):
        raise RuntimeError("the engine's weights are released; call resume_memory(['weights']) before export")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model(engine.config.model, engine.config.load_format)
    state = _state_dict(model, dtype)
    save_torch_state_dict(state, out, max_shard_size=MAX_SHARD_SIZE)

    hf_config = copy.deepcopy(source.hf_config)
    hf_config.dtype = next(iter(state.values())).dtype    # recorded, so loaders pick the saved precision
    hf_config.save_pretrained(out)
    _save_generation_config(source.model_dir, out)
    if engine.tokenizer is not None:
        engine.tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def _state_dict(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Parameters by HF name on the CPU. named_parameters() yields a tied lm_head.weight only once,
    under the embedding's name, which is what tied HF checkpoints hold."""
    state = {}
    for name, p in model.named_parameters():
        # copy=True: inference stacks q/k/v (and gate/up) into one storage, and a checkpoint writer
        # refuses tensors that share one.
        state[name] = p.detach().to(device="cpu", dtype=dtype or p.dtype, copy=True).contiguous()
    return state


def _save_generation_config(model_dir: Path | None, out: Path) -> None:
    """Carry the source's generation defaults (eos ids, sampling settings) over when it has any."""
    if model_dir is None or not (Path(model_dir) / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    GenerationConfig.from_pretrained(model_dir).save_pretrained(out)
