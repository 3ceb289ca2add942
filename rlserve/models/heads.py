"""Pooling models: our Llama-family decoder under a classification or reward head, or under none (an
encoder whose pooled hidden states are embeddings).

HF names the heads' weights `score.weight` (`*ForSequenceClassification`: one linear layer, no bias) and
`score.0.*`, `score.2.*` (`Qwen2ForRewardModel`: linear, ReLU, linear, with biases). Such checkpoints carry
no lm_head: the model ties it to the embedding (no memory) and the engine refuses to generate with it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch
from torch import nn

from rlserve.config import ModelConfig
from rlserve.layers.fused import EAGER, Kernels
from rlserve.models.llama import LlamaForCausalLM


class LlamaForPooling(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, kernels: Kernels = EAGER) -> None:
        super().__init__(replace(cfg, tie_word_embeddings=True), kernels)
        h = cfg.hidden_size
        self.score: nn.Module | None = None
        if cfg.head == "Qwen2ForRewardModel":
            self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, cfg.num_labels))
        elif cfg.num_labels > 0:
            self.score = nn.Linear(h, cfg.num_labels, bias=False)

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, hidden] last-token states → [R, num_labels] float32 scores."""
        if self.score is None:
            raise ValueError(f"{self.config.head} has no classification head")
        return self.score(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(_with_model_prefix(weights, self.config.head))


def _with_model_prefix(weights: Iterable[tuple[str, torch.Tensor]], head: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Encoder checkpoints (`*Model`, e.g. sentence-transformers exports) name the decoder's tensors
    without the `model.` prefix that the causal and classification classes use."""
    bare = head is not None and head.endswith("Model") and head != "Qwen2ForRewardModel"
    for name, tensor in weights:
        if bare and not name.startswith(("model.", "score.", "lm_head.")):
            name = "model." + name
        yield name, tensor


def model_class(cfg: ModelConfig) -> type[LlamaForCausalLM]:
    """The class that runs `cfg`'s architecture."""
    return LlamaForPooling if cfg.head is not None else LlamaForCausalLM
