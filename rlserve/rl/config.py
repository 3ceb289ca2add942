"""Training configuration: typed dataclasses, loadable from YAML, with dotted command-line overrides
(`rollout.group_size=16 optim.lr=1e-5 kl.coef=0.01`). Every key is documented in docs/rl.md."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlserve.config import DType, Elementwise, EngineConfig, option_names
from rlserve.rl.algorithms import AggMode, KLKind
from rlserve.rl.cluster.config import ClusterSection, TrainerSection

ADVANTAGES = ("grpo", "rloo", "reinforce++", "reinforce++-baseline", "gae")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_MODES = ("reward", "loss")
KL_ESTIMATORS = ("k1", "k2", "k3")
BACKENDS = ("colocated", "server")
WEIGHT_SYNCS = ("tensor", "disk", "distributed")
WEIGHT_SYNC_BACKENDS = ("auto", "gloo", "nccl")
PARTIAL_OLD_TOKENS = ("mask", "tis", "keep")
ASYNC_MODES = ("off", "one_step_off", "full")


def _one_of(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"config key {where!r} must be one of {', '.join(allowed)}; got {value!r}")


def _training_engine() -> EngineConfig:
    # float32 weights for the optimizer; eager elementwise ops, the reference every fused path is tested
    # against (a forward under autograd runs them anyway, so only rollouts could use fused kernels).
    return EngineConfig(dtype=DType.FLOAT32, compile=Elementwise.EAGER)


@dataclass
class ModelSection:
    """The `model:` section: the rollout engine's options by their EngineConfig names (`dtype`, `device`,
    `max_total_tokens`, ...; `path` is the config's `model`), plus how the trainer shares its memory. The
    engine's seed is the run's top-level `seed`."""
    engine: EngineConfig = field(default_factory=_training_engine)
    # Free the engine's KV pool between rollout and the next rollout, so logprob recompute and the
    # update have that memory (colocated on one GPU). Costs a reallocation (and on CUDA a graph
    # recapture) per step; off by default.
    release_kv_cache: bool = False

    @property
    def path(self) -> str | None:
        return self.engine.model

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str) -> ModelSection:
        options = dict(data)
        known = ["path", "release_kv_cache", *(n for n in option_names() if n not in ("model", "seed"))]
        unknown = [k for k in options if k not in known]
        if unknown:
            hint = " (the engine's seed is the top-level `seed`)" if "seed" in unknown else ""
            raise ValueError(f"unknown config key {where + unknown[0]!r}{hint}; known: {', '.join(known)}")
        release = _coerce(options.pop("release_kv_cache", False), False, f"{where}release_kv_cache")
        if "path" in options:
            options["model"] = options.pop("path")
        try:
            return cls(_training_engine().with_options(**options), release)
        except ValueError as e:
            raise ValueError(f"config section {where.rstrip('.')!r}: {e}") from None

    def to_mapping(self) -> dict[str, Any]:
        """The section as YAML writes it (from_mapping reads it back)."""
        options = self.engine.to_options()
        del options["seed"]
        return {"path": options.pop("model"), **options, "release_kv_cache": self.release_kv_cache}


@dataclass
class RewardModelSection:
    """task.reward_model: with task.reward = "model", a classification/reward model scores each sample's
    prompt + completion (rlserve/rl/reward_model.py); reward = weight * score + rule_weight * rule."""
    path: str | None = None              # a checkpoint run in this process (LLM.classify) ...
    url: str | None = None               # ... or a server's /classify (rlserve, SGLang)
    label: int = 0                       # which of the head's outputs is the score
    weight: float = 1.0
    rule: str | None = None              # a built-in rule reward added to it (rewards.BUILTIN_REWARDS)
    rule_weight: float = 0.0
    dtype: str = "auto"                  # the in-process model's dtype

    def __post_init__(self) -> None:
        if self.path is not None and self.url is not None:
            raise ValueError("task.reward_model: give path or url, not both")


@dataclass
class TaskSection:
    name: str = "arithmetic"             # see rlserve.rl.tasks.TASKS; ignored when `dataset` is set
    reward: str = "numeric"              # see rlserve.rl.rewards.BUILTIN_REWARDS, or "model" (reward_model)
    options: dict[str, Any] = field(default_factory=dict)   # extra keyword arguments for the task
    dataset: str | None = None           # JSONL/parquet train file instead of the synthetic generator
    eval_dataset: str | None = None      # held-out file (default: the task's "test" split)
    prompts_per_step: int = 8
    eval_prompts: int = 32
    eval_every: int = 5                  # 0: never
    on_invalid_reward: str = "error"     # a NaN/inf reward: error (name the sample) | drop (its group)
    reward_model: RewardModelSection = field(default_factory=RewardModelSection)

    def __post_init__(self) -> None:
        _one_of("task.on_invalid_reward", self.on_invalid_reward, ("error", "drop"))


AGENT_TOOLS = ("python", "lookup")
TOOL_PARSERS = ("qwen", "llama3", "markdown")


@dataclass
class AgentSection:
    """`rollout.agent`: multi-turn, tool-using rollouts (rlserve/rl/agent/, docs/rl.md "Agentic
    rollouts"). rollout.max_tokens is then each sample's whole response budget (its turns, tool results
    and separators)."""
    enabled: bool = False
    max_turns: int = 4                   # assistant turns per sample
    max_turn_tokens: int = 128           # new tokens per assistant turn
    tools: list[str] = field(default_factory=lambda: ["python"])   # python (sandbox) | lookup (corpus)
    # the server's parser family: qwen (<tool_call>) | llama3 (bare JSON) | markdown (```python blocks)
    tool_parser: str = "qwen"
    tool_timeout_s: float = 10.0         # a slower call returns an error message to the model
    max_tool_output_chars: int = 1000
    sandbox_cpu_s: int = 2               # python: CPU seconds (RLIMIT_CPU)
    sandbox_memory_mb: int = 512         # python: address space (RLIMIT_AS)
    corpus: str | None = None            # lookup: a JSONL file of {"title", "text"} passages
    lookup_k: int = 3                    # lookup: passages returned

    def __post_init__(self) -> None:
        _one_of("rollout.agent.tool_parser", self.tool_parser, TOOL_PARSERS)
        if isinstance(self.tools, str):
            self.tools = [self.tools]
        for name in self.tools:
            _one_of("rollout.agent.tools[]", name, AGENT_TOOLS)
        if "lookup" in self.tools and not self.corpus:
            raise ValueError("rollout.agent.tools has lookup: give rollout.agent.corpus (a JSONL file)")
        if self.max_turns < 1 or self.max_turn_tokens < 1 or self.tool_timeout_s <= 0:
            raise ValueError("rollout.agent: max_turns and max_turn_tokens must be ≥ 1, tool_timeout_s > 0")


@dataclass
class RolloutSection:
    group_size: int = 8                  # completions per prompt
    max_tokens: int = 16
    temperature: float = 1.0
    ignore_eos: bool = False             # true: every completion runs to max_tokens (throughput tests)
    constraint: dict[str, Any] | None = None   # structured rollouts, e.g. {"regex": "[ab]{8}"}
    # Where rollouts run: colocated (the in-process engine serves the trained module itself) or server
    # (rlserve servers over HTTP; the trainer pushes its weights to them before every step's rollout).
    backend: str = "colocated"
    server_urls: list[str] = field(default_factory=list)   # server mode; empty: launch one on loopback
    # server mode behind sglang-router (docs/router.md): the router's URL (its workers started with
    # --logprobs-mode tempered), or dp > 1: the trainer launches dp servers and a router on loopback
    router_url: str = ""
    dp: int = 1
    # server mode: tensor (shared memory / CUDA IPC) | disk (safetensors) | distributed (a torch.distributed
    # group, trainer rank 0). The servers' admin key, when they have one, comes from the
    # RLSERVE_ADMIN_API_KEY environment variable (never written to config.json).
    weight_sync: str = "tensor"
    weight_sync_backend: str = "auto"    # distributed: auto (nccl when the policy is on CUDA, else gloo) | gloo | nccl
    weight_sync_bucket_mb: int = 512     # tensor: MiB per call; distributed: MiB per flattened broadcast
    # The servers release their weights and KV cache after each rollout and take them back at the next
    # push, so a trainer on the same GPU has that memory for its update.
    server_offload: bool = False
    # Over-sampling and partial rollouts (colocated or server; docs/rl.md "Over-sampling, partial rollouts and
    # asynchronous training"): start ceil(over_sample · prompts_per_step) groups, abort the rest once enough
    # have passed the dynamic-sampling filter; their prompts refill the next step first.
    over_sample: float = 1.0
    # Aborted groups' unfinished samples resume next step with their remaining token budget (new weights);
    # tokens sampled under an older weight version are masked out of the loss | importance-weighted
    # (tis: min(π_now / π_old, partial_tis_cap)) | kept as they are.
    partial: bool = False
    partial_old_tokens: str = "mask"
    partial_tis_cap: float = 2.0
    agent: AgentSection = field(default_factory=AgentSection)   # multi-turn tool use

    def __post_init__(self) -> None:
        _one_of("rollout.backend", self.backend, BACKENDS)
        _one_of("rollout.partial_old_tokens", self.partial_old_tokens, PARTIAL_OLD_TOKENS)
        if self.over_sample < 1.0:
            raise ValueError(f"rollout.over_sample must be ≥ 1; got {self.over_sample}")
        if self.agent.enabled and (self.over_sample > 1 or self.partial):
            # a multi-turn sample cannot be cut and resumed between its turns and its tools
            raise ValueError("rollout.agent does not combine with rollout.over_sample or rollout.partial")
        grammar = sorted(set(self.constraint or {}) & {"regex", "json_schema", "json_object", "ebnf"})
        if self.partial and grammar:
            raise ValueError(f"rollout.partial cannot resume a sample under rollout.constraint {grammar[0]} "
                             "(its grammar state is not kept)")
        _one_of("rollout.weight_sync", self.weight_sync, WEIGHT_SYNCS)
        _one_of("rollout.weight_sync_backend", self.weight_sync_backend, WEIGHT_SYNC_BACKENDS)
        if self.weight_sync_bucket_mb < 1:
            raise ValueError(f"rollout.weight_sync_bucket_mb must be ≥ 1; got {self.weight_sync_bucket_mb}")
        if isinstance(self.server_urls, str):             # one URL from the command line
            self.server_urls = [self.server_urls]
        if not isinstance(self.server_urls, list) or not all(isinstance(u, str) for u in self.server_urls):
            raise ValueError(f"rollout.server_urls expects a list of URLs, got {self.server_urls!r}")
        if self.dp < 1:
            raise ValueError(f"rollout.dp must be ≥ 1; got {self.dp}")
        if sum((bool(self.server_urls), bool(self.router_url), self.dp > 1)) > 1:
            raise ValueError("give one of rollout.server_urls, rollout.router_url and rollout.dp > 1")


@dataclass
class AsyncSection:
    """Rollout overlapped with training (server mode; colocated runs stay synchronous)."""
    # off | one_step_off (step n+1's rollout runs while step n trains) | full (a producer keeps generating
    # into a buffer; the trainer takes groups no staler than max_staleness)
    mode: str = "off"
    max_staleness: int = 1               # full: trainer version − a sample's oldest token's version ≤ this
    groups_in_flight: int = 0            # full: groups a producer draws at a time (0: prompts_per_step)
    producers: int = 1                   # full: producer threads, their chunks overlapping (≥ 2: no idle tail)
    # the draws run in a child process (rl/draw_process.py): their Python (HTTP, JSON, tool results) takes
    # none of the trainer's GIL; the reward function must then pickle (a module-level function)
    rollout_process: bool = False

    def __post_init__(self) -> None:
        _one_of("asynchronous.mode", self.mode, ASYNC_MODES)
        if self.max_staleness < 0 or self.groups_in_flight < 0:
            raise ValueError("asynchronous.max_staleness and groups_in_flight must be ≥ 0")
        if isinstance(self.producers, bool) or not isinstance(self.producers, int) or self.producers < 1:
            raise ValueError(f"asynchronous.producers must be an integer ≥ 1; got {self.producers!r}")


@dataclass
class AlgorithmSection:
    advantage: str = "grpo"              # grpo | rloo | reinforce++ | reinforce++-baseline | gae (PPO)
    normalize_std: bool = True           # grpo only: divide by the group's std (off = Dr. GRPO)
    loss_agg: AggMode = "token-mean"     # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    clip_low: float = 0.2
    clip_high: float = 0.28              # > clip_low is DAPO's clip-higher
    entropy_coef: float = 0.0            # loss −= coef · entropy
    dynamic_sampling: bool = False       # drop groups whose rewards all agree (no gradient signal)
    ppo_epochs: int = 1                  # passes over the step's samples
    minibatch_size: int = 0              # samples per optimizer step; 0 = the whole step at once
    micro_batch_size: int = 0            # samples per forward/backward inside a minibatch; 0 = all
    # samples per forward of the logprob pass before the update (old, reference, values): it keeps no
    # activations, so it can take larger chunks than a backward; 0 = micro_batch_size
    logprob_micro_batch_size: int = 0
    tis_cap: float | None = None         # truncated importance sampling: w = min(π_old / π_engine, cap)
    gamma: float = 1.0                   # discount for gae and reinforce++
    lam: float = 1.0                     # GAE λ
    # Numerical guards, off by default (verl's values in docs/rl.md): clamp log π − log π_old (PPO ratio)
    # and the k3 estimator's log-ratio to ±log_ratio_clamp (verl 20), k3's value to ±k3_clamp (verl 10),
    # and dual-clip PPO: for A < 0 the per-token loss is at most −dual_clip · A (verl clip_ratio_c = 3).
    log_ratio_clamp: float | None = None
    k3_clamp: float | None = None
    dual_clip: float | None = None

    @property
    def logprob_chunk(self) -> int:
        """Samples per forward of the logprob pass (0: all at once)."""
        return self.logprob_micro_batch_size or self.micro_batch_size or self.minibatch_size

    def __post_init__(self) -> None:
        _one_of("algorithm.advantage", self.advantage, ADVANTAGES)
        _one_of("algorithm.loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        if (self.ppo_epochs < 1 or self.minibatch_size < 0 or self.micro_batch_size < 0
                or self.logprob_micro_batch_size < 0):
            raise ValueError("algorithm.ppo_epochs must be ≥ 1, minibatch_size, micro_batch_size and "
                             "logprob_micro_batch_size ≥ 0")
        for name in ("log_ratio_clamp", "k3_clamp", "dual_clip"):     # YAML may give an int or a string
            if (value := getattr(self, name)) is not None:
                try:
                    setattr(self, name, float(value))
                except (TypeError, ValueError):
                    raise ValueError(f"algorithm.{name} expects a number or null, got {value!r}") from None
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"algorithm.dual_clip must be > 1 (verl uses 3.0); got {self.dual_clip}")
        for name in ("log_ratio_clamp", "k3_clamp"):
            if (value := getattr(self, name)) is not None and value <= 0:
                raise ValueError(f"algorithm.{name} must be > 0; got {value}")


@dataclass
class KLSection:
    coef: float = 0.0                    # > 0 builds a frozen reference copy of the initial policy
    mode: str = "loss"                   # loss: a loss term; reward: a per-token reward penalty
    estimator: KLKind = "k3"             # k1 | k2 | k3

    def __post_init__(self) -> None:
        _one_of("kl.mode", self.mode, KL_MODES)
        _one_of("kl.estimator", self.estimator, KL_ESTIMATORS)


@dataclass
class CriticSection:
    """The value model of PPO (algorithm.advantage=gae): a copy of the policy's trunk + a value head."""
    lr: float = 1e-5
    value_clip: float = 0.2


@dataclass
class OptimSection:
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0           # 0: no clipping (the norm is still logged)
    warmup_steps: int = 0                # linear warmup over this many train steps, then constant


@dataclass
class LoggingSection:
    progress_bar: bool = True
    tensorboard: bool = False            # <output_dir>/tensorboard
    plot_every: int = 0                  # rewrite <output_dir>/metrics.png every N steps (always at the end)


@dataclass
class TrainConfig:
    steps: int = 50
    seed: int = 0
    output_dir: str = "runs/rl"
    checkpoint_every: int = 0            # 0: no checkpoints
    checkpoint_keep: int = 2             # newest checkpoints kept on disk
    resume: bool = False                 # continue from the newest checkpoint in output_dir
    resume_from: str | None = None       # ... or from this checkpoint directory
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    asynchronous: AsyncSection = field(default_factory=AsyncSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    kl: KLSection = field(default_factory=KLSection)
    critic: CriticSection = field(default_factory=CriticSection)
    optim: OptimSection = field(default_factory=OptimSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)     # ranks and FSDP2 (docs/cluster.md)
    cluster: ClusterSection = field(default_factory=ClusterSection)     # local processes or Ray placement

    def __post_init__(self) -> None:
        r = self.rollout
        if r.backend == "server" and self.asynchronous.mode != "off" and (r.over_sample > 1 or r.partial):
            raise ValueError("rollout.over_sample and rollout.partial shape synchronous steps; with asynchronous.mode "
                             f"{self.asynchronous.mode} the servers never wait for stragglers: turn one of them off")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown config key {where}{key!r}; known: {', '.join(fields)}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is ModelSection:
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key!r} is a section, got {value!r}")
            kwargs[key] = ModelSection.from_mapping(value, f"{where}{key}.")
        elif sub is not None and dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key!r} is a section, got {value!r}")
            kwargs[key] = _build(sub, value, f"{where}{key}.")
        elif sub is dict:
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key!r} expects a mapping, got {value!r}")
            kwargs[key] = value
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
    elif kind is str and value is False and default == "off":
        return "off"          # YAML 1.1 reads `off` as false (asynchronous.mode=off)
    raise ValueError(f"config key {where!r} expects {kind.__name__}, got {value!r}")


def _parse_value(text: str) -> Any:
    import yaml
    return yaml.safe_load(text)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
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
    """The config as plain values, in the layout load_config reads."""
    return {**dataclasses.asdict(cfg), "model": cfg.model.to_mapping()}
