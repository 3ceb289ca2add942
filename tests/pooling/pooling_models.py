"""Tiny random pooling checkpoints (classification, reward, encoder) and transformers references."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch


def copy_tokenizer(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():         # norms and biases start at constants; make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def make_classifier(preset: str, out: Path, tokenizer_dir: Path, num_labels: int = 3) -> Path:
    """A *ForSequenceClassification checkpoint of a tiny preset (transformers' own class)."""
    from transformers import AutoModelForSequenceClassification

    from rlserve.models.presets import preset_hf_config

    cfg = preset_hf_config(preset)
    cfg.architectures = [cfg.architectures[0].replace("ForCausalLM", "ForSequenceClassification")]
    cfg.num_labels, cfg.initializer_range, cfg.pad_token_id = num_labels, 0.1, 0
    torch.manual_seed(4321)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    _perturb(model)
    model.save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    return out


def make_qwen2_rm(out: Path, tokenizer_dir: Path) -> Path:
    """A Qwen2ForRewardModel checkpoint (the remote-code class: Qwen2Model + score = Linear, ReLU, Linear),
    written by hand since transformers has no such class."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    from rlserve.models.presets import preset_hf_config

    cfg = preset_hf_config("tiny-qwen2")
    cfg.initializer_range = 0.1
    torch.manual_seed(99)
    base = AutoModel.from_config(cfg, dtype=torch.float32)
    _perturb(base)
    h = cfg.hidden_size
    tensors = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    tensors.update({"score.0.weight": torch.randn(h, h) * 0.1, "score.0.bias": torch.randn(h) * 0.1,
                    "score.2.weight": torch.randn(1, h) * 0.1, "score.2.bias": torch.randn(1) * 0.1})
    cfg.architectures = ["Qwen2ForRewardModel"]
    cfg.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"))
    copy_tokenizer(tokenizer_dir, out)
    return out


@torch.no_grad()
def hf_qwen2_rm_score(path: Path, ids: list[int]) -> float:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(path)
    cfg.architectures = ["Qwen2Model"]
    sd = load_file(str(path / "model.safetensors"))
    base = AutoModel.from_config(cfg, dtype=torch.float32).eval()
    base.load_state_dict({k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")})
    h = base(torch.tensor([ids])).last_hidden_state[0, -1]
    h = torch.relu(h @ sd["score.0.weight"].T + sd["score.0.bias"])
    return float((h @ sd["score.2.weight"].T + sd["score.2.bias"])[0])


@torch.no_grad()
def hf_embedding(path: Path, ids: list[int], pooling: str) -> list[float]:
    """transformers' AutoModel (the decoder without its LM head), pooled the same way, normalised."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    h = model(torch.tensor([ids])).last_hidden_state[0]
    vec = h[-1] if pooling == "last" else h.mean(0)
    return torch.nn.functional.normalize(vec, dim=0).tolist()


@torch.no_grad()
def hf_classify(path: Path, ids: list[int]) -> list[float]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    return model(torch.tensor([ids])).logits[0].tolist()
