"""Pooling requests: embeddings and classification scores from one prefill, no decoding.

A request with PoolingParams is scheduled and prefilled like any other (chunked, batched with generation,
retracted under memory pressure). Where its prompt completes, instead of sampling, the runner pools the
hidden states after the final norm: the last token's state (`last`), or the mean over every prompt
position (`mean`, summed chunk by chunk); embeddings are then truncated to `dimensions` and L2-normalised,
classification scores are the model's head over the last token's state. The request finishes there.

The prefix cache: a cached prefix's positions are not computed again, and the last token is always
computed (a match never covers the whole prompt), so last-token pooling and classification use the cache.
Mean pooling needs every position's state: its requests bypass the cache match (their KV is still
cached for later requests).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlserve.config import ModelConfig
from rlserve.engine.request import Request

if TYPE_CHECKING:
    from rlserve.engine.scheduler import ScheduledBatch

TASKS = ("embed", "classify")
POOLINGS = ("last", "mean")


@dataclass(frozen=True)
class PoolingParams:
    task: str = "embed"                 # "embed" | "classify"
    pooling: str | None = None          # "last" | "mean"; None: the engine's default for the model
    normalize: bool = True              # embeddings: L2-normalise (after truncating to dimensions)
    dimensions: int | None = None       # embeddings: keep the first this many (Matryoshka models only)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"pooling task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer; got {self.dimensions!r}")

    @property
    def mean(self) -> bool:
        return self.pooling == "mean"


@dataclass(frozen=True)
class ModelPooling:
    """What a model directory says about its embeddings (sentence-transformers files, config.json)."""
    pooling: str | None = None
    normalize: bool | None = None
    matryoshka: bool = False
    dimensions: tuple[int, ...] = ()    # the sizes it was trained to truncate to (empty: any)


@lru_cache(maxsize=8)
def model_pooling(model: str | None) -> ModelPooling:
    """Read a model directory's sentence-transformers pooling module (modules.json → its config) and
    config.json's Matryoshka fields (`is_matryoshka`, `matryoshka_dimensions`)."""
    if model is None or not Path(model).is_dir():
        return ModelPooling()
    root = Path(model)
    pooling = normalize = None
    modules = _read_json(root / "modules.json")
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
        normalize = any(t.endswith("Normalize") for t in types)
        for m in modules:
            if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling"):
                cfg = _read_json(root / str(m.get("path", "")) / "config.json") or {}
                if cfg.get("pooling_mode_lasttoken"):
                    pooling = "last"
                elif cfg.get("pooling_mode_mean_tokens"):
                    pooling = "mean"
    hf = _read_json(root / "config.json") or {}
    dims = hf.get("matryoshka_dimensions") or ()
    return ModelPooling(pooling, normalize, bool(hf.get("is_matryoshka") or dims), tuple(int(d) for d in dims))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_request(cfg: ModelConfig, model: str | None, default_pooling: str | None,
                  pooling: PoolingParams | None, n: int) -> PoolingParams | None:
    """Validate a request against the model: a pooling model only pools, classification needs a head,
    `dimensions` needs a Matryoshka model. Returns the params with the pooling mode filled in."""
    if pooling is None:
        if cfg.head is not None:
            raise ValueError(f"this model ({cfg.head}) has no language-model head: it serves embeddings "
                             f"and classification, not generation")
        return None
    if not isinstance(pooling, PoolingParams):
        raise TypeError(f"pooling must be PoolingParams, got {type(pooling).__name__}")
    if n != 1:
        raise ValueError("a pooling request has one result: n must be 1")
    if pooling.task == "classify":
        if cfg.num_labels <= 0:
            raise ValueError("this model has no classification head (a *ForSequenceClassification or "
                             "*ForRewardModel checkpoint has one)")
        return replace(pooling, pooling="last")
    info = model_pooling(model)
    dims = pooling.dimensions
    if dims is not None and dims != cfg.hidden_size:
        if not info.matryoshka:
            raise ValueError(f"this model does not support dimensions={dims}: its embeddings have "
                             f"{cfg.hidden_size} dimensions and it is not a Matryoshka model")
        if dims > cfg.hidden_size or (info.dimensions and dims not in info.dimensions):
            allowed = ", ".join(map(str, info.dimensions)) if info.dimensions else f"1..{cfg.hidden_size}"
            raise ValueError(f"dimensions={dims} is not supported by this model; choose one of {allowed}")
    return replace(pooling, pooling=pooling.pooling or default_pooling or info.pooling or "last")


def pool(model: Any, hidden: torch.Tensor, sb: ScheduledBatch) -> list[Request]:
    """Pool the pooling requests of a prefill step (hidden: [T, hidden], the step's flat positions in
    request order). Requests whose prompt completes get `pooled` and are returned."""
    done: list[Request] = []
    at = 0
    for req, completes in zip(sb.reqs, sb.completes):
        start, n = at, req.chunk_len
        at += n
        p = req.pooling
        if p is None:
            continue
        if p.mean:
            part = hidden[start:start + n].float().sum(0)
            # kv_len is the chunk's first position: 0 starts (or, after a retraction, restarts) the sum.
            req.pool_sum = part if req.kv_len == 0 or req.pool_sum is None else req.pool_sum + part
        if not completes:
            continue
        last = hidden[start + n - 1]
        if p.task == "classify":
            vec = model.classify(last[None])[0]
        else:
            vec = req.pool_sum / req.num_tokens if p.mean else last.float()
            if p.dimensions is not None:
                vec = vec[:p.dimensions]
            if p.normalize:
                vec = torch.nn.functional.normalize(vec, dim=0)
        req.pooled = vec.tolist()
        req.pool_sum = None
        done.append(req)
    return done
