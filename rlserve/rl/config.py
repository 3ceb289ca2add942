"""Training configuration: typed dataclasses, loadable from YAML, with dotted command-line overrides
(`rollout.group_size=16 optim.lr=1e-5`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlserve.rl.grpo import GRPOConfig


@dataclass
class ModelSection:
    path: str | None = None              # None → the default SmolLM2; a HF dir, .gguf or preset
    dtype: str = "float32"
    max_total_tokens: int | None = None


@dataclass
class TaskSection:
    name: str = "arithmetic"             # see rlserve.rl.tasks.TASKS
    reward: str = "numeric"              # see rlserve.rl.rewards.BUILTIN_REWARDS
    prompts_per_step: int = 8
    eval_prompts: int = 32
    eval_every: int = 5


@dataclass
class OptimSection:
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 50
    seed: int = 0
    output_dir: str = "runs/rl"
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    rollout: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimSection = field(default_factory=OptimSection)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown config key {where}{key!r}; known: {', '.join(fields)}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key!r} is a section, got {value!r}")
            kwargs[key] = _build(sub, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, fields[key].default, f"{where}{key}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Match the type of the field's default (YAML reads 3e-6 as a string, 1 as an int)."""
    if default is None or default is dataclasses.MISSING or value is None:
        return value
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind in (int, float) and not isinstance(value, bool):
        try:
            out = kind(value)
            if kind is int and isinstance(value, float) and value != out:
                raise ValueError
            return out
        except (TypeError, ValueError):
            pass
    elif isinstance(value, kind):
        return value
    raise ValueError(f"config key {where!r} expects {kind.__name__}, got {value!r}")


def _parse_value(text: str) -> Any:
    import yaml
    return yaml.safe_load(text)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    import yaml
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = _parse_value(value)
    return _build(TrainConfig, data, "")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
