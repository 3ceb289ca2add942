"""Typed configuration, layered model → cache → scheduler → engine.

`EngineConfig` is the only thing that configures an engine. Its options (the fields of EngineConfig and
of its CacheConfig and SchedulerConfig sections) are addressed by their plain names everywhere: as
keyword arguments of `LLM(...)` and `EngineConfig.with_options(...)`, as command-line flags
(rlserve.config_args, generated from these fields) and as the keys of the RL config's `model` section.
Each field's `help` metadata is the one description of what it does.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Self, TypeVar

if TYPE_CHECKING:
    import torch

_T = TypeVar("_T")


def _opt(default: _T, help: str) -> _T:
    """A field with its default and the description the CLI flags and docs show."""
    return field(default=default, metadata={"help": help})


# ---- enumerations ----
class Choice(StrEnum):
    """A closed set of string values. Members compare and hash equal to their value ("auto")."""

    @classmethod
    def coerce(cls, value: object, option: str, legacy: Mapping[Any, Self] | None = None) -> Self:
        """The member for `value` (a member, its value, or a legacy spelling); a ValueError listing the
        valid values otherwise."""
        if isinstance(value, cls):
            return value
        if legacy is not None and isinstance(value, (str, bool)) and value in legacy:
            return legacy[value]
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise ValueError(f"{option} must be one of {', '.join(m.value for m in cls)}; got {value!r}")


class Switch(Choice):
    """A feature that is on, off, or chosen by the engine for its device (AUTO)."""
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Elementwise(Choice):
    """How the elementwise chains (norms, rotary, the gated activation) run: Triton kernels on CUDA,
    torch.compile (inductor), or eager torch ops; AUTO is TRITON on CUDA with Triton, INDUCTOR on CUDA
    without it, EAGER on a CPU."""
    AUTO = "auto"
    TRITON = "triton"
    INDUCTOR = "inductor"
    EAGER = "eager"


class DType(Choice):
    """The model's dtype; AUTO is float32 on a CPU, bfloat16 on CUDA."""
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class LoadFormat(Choice):
    """Where the weights come from; AUTO reads the path (a .gguf file or a safetensors directory)."""
    AUTO = "auto"
    SAFETENSORS = "safetensors"
    GGUF = "gguf"
    DUMMY = "dummy"


class AttentionBackend(Choice):
    """AUTO is TRITON on CUDA with Triton installed, TORCH otherwise."""
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


class KVCacheDtype(Choice):
    """AUTO stores K and V in the model's dtype; FP8_E4M3 scales them per token and head (half the bytes)."""
    AUTO = "auto"
    FP8_E4M3 = "fp8_e4m3"


class SchedulePolicy(Choice):
    """FCFS admits in arrival order; LPM admits the longest cached prefix first."""
    FCFS = "fcfs"
    LPM = "lpm"


_DTYPE_ALIASES = {"fp32": DType.FLOAT32, "bf16": DType.BFLOAT16, "fp16": DType.FLOAT16, "half": DType.FLOAT16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ("bfloat16", "bf16", DType.BFLOAT16) or itself; "auto" has no answer
    without a device, so it is rejected here."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = DType.coerce(dtype, "dtype", _DTYPE_ALIASES)
    if name is DType.AUTO:
        raise ValueError("dtype 'auto' depends on the device; resolve it before asking for a torch dtype")
    return {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}[name]


# ---- value checks shared by the sections ----
def _check_int(option: str, value: object, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        need = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ValueError(f"{option} must be {need}{' or None' if optional else ''}; got {value!r}")


def _check_float(obj: object, option: str, low: float, high: float, low_open: bool = False) -> None:
    value = getattr(obj, option)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (low < value if low_open else low <= value) or value > high:
        bound = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{option} must be a number in {bound}; got {value!r}")
    object.__setattr__(obj, option, float(value))


def _check_bool(obj: object, option: str) -> None:
    if not isinstance(getattr(obj, option), bool):
        raise ValueError(f"{option} must be true or false; got {getattr(obj, option)!r}")


ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Pooling architectures (models/heads.py): the same decoder under a classification/reward head, or none
# (an encoder); each maps to the causal architecture whose decoder it shares.
POOLING_ARCHITECTURES = {
    "LlamaForSequenceClassification": "LlamaForCausalLM", "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM", "Qwen3ForSequenceClassification": "Qwen3ForCausalLM",
    "Qwen2ForRewardModel": "Qwen2ForCausalLM", "LlamaModel": "LlamaForCausalLM", "MistralModel": "MistralForCausalLM",
    "Qwen2Model": "Qwen2ForCausalLM", "Qwen3Model": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts our Llama-family model needs, read from a HF config."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool = False     # Qwen2 carries q/k/v biases
    qk_norm: bool = False            # Qwen3 RMS-normalises q and k per head
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    head: str | None = None          # a POOLING_ARCHITECTURES name; None: a causal LM
    num_labels: int = 0              # the classification head's outputs

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Build from a transformers PretrainedConfig (v4 or v5 layout)."""
        archs = getattr(hf, "architectures", None) or []
        arch = archs[0] if archs else _ARCH_BY_TYPE.get(getattr(hf, "model_type", ""), "")
        head = arch if arch in POOLING_ARCHITECTURES else None
        arch = POOLING_ARCHITECTURES.get(arch, arch)
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; rlserve supports {', '.join(ARCHITECTURES)}")
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if rope_type in ("default", None) else {**rope, "rope_type": rope_type}
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        return cls(
            architecture=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
            num_heads=num_heads, num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps, rope_theta=float(theta),
            max_position=getattr(hf, "max_position_embeddings", 4096),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM", rope_scaling=scaling, eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None), head=head,
            num_labels=_num_labels(head, hf),
        )


def _num_labels(head: str | None, hf: Any) -> int:
    if head == "Qwen2ForRewardModel":
        return 1                      # one scalar reward, whatever the config says
    if head is None or head.endswith("Model"):
        return 0                      # a causal LM, or an encoder without a head
    return int(getattr(hf, "num_labels", 1))


_ARCH_BY_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class CacheConfig:
    """How big the KV pool is, and whether finished prefixes stay cached."""
    kv_cache_bytes: int = _opt(256 << 20, "KV pool byte budget on a CPU (the flag takes 512M, 2G, ...)")
    gpu_memory_fraction: float = _opt(0.85, "KV pool on CUDA: this fraction of the memory left after the weights")
    max_total_tokens: int | None = _opt(None, "KV pool size in tokens; overrides both budgets when set")
    enable_radix_cache: bool = _opt(True, "keep finished prompts' KV in a radix tree for later prefixes")

    def __post_init__(self) -> None:
        _check_int("kv_cache_bytes", self.kv_cache_bytes, 1)
        _check_float(self, "gpu_memory_fraction", 0.0, 1.0, low_open=True)
        _check_int("max_total_tokens", self.max_total_tokens, 1, optional=True)
        _check_bool(self, "enable_radix_cache")


@dataclass(frozen=True)
class SchedulerConfig:
    """Admission and batching: how many requests run and wait, and how prefill is chunked."""
    max_running_requests: int = _opt(256, "cap on concurrently running requests")
    chunked_prefill_size: int | None = _opt(
        None, "prefill tokens per step; None: 8192 on CUDA (fewer, fuller prefill steps amortise the "
              "per-step host cost), 2048 on a CPU (decode steps don't wait behind long prefills)")
    policy: SchedulePolicy = _opt(SchedulePolicy.FCFS, "admission order: fcfs (arrival) or lpm "
                                                       "(longest cached prefix first)")
    init_new_token_ratio: float = _opt(0.7, "share of max_new_tokens reserved at admission")
    min_new_token_ratio: float = _opt(0.1, "the floor the reserved share decays to")
    new_token_ratio_decay: float = _opt(0.001, "how much the reserved share falls per decode step")
    retract_ratio_step: float = _opt(0.1, "how much a retraction raises the reserved share")
    max_waiting_requests: int | None = _opt(
        None, "beyond this many waiting requests, new ones are refused (QueueFullError; a server "
              "answers 503); None: no limit")

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", SchedulePolicy.coerce(self.policy, "policy"))
        _check_int("max_running_requests", self.max_running_requests, 1)
        _check_int("chunked_prefill_size", self.chunked_prefill_size, 1, optional=True)
        _check_int("max_waiting_requests", self.max_waiting_requests, 1, optional=True)
        for ratio in ("init_new_token_ratio", "min_new_token_ratio", "new_token_ratio_decay", "retract_ratio_step"):
            _check_float(self, ratio, 0.0, 1.0)
        if self.min_new_token_ratio > self.init_new_token_ratio:
            raise ValueError(f"min_new_token_ratio ({self.min_new_token_ratio}) must not exceed "
                             f"init_new_token_ratio ({self.init_new_token_ratio})")


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that configures an engine. Options are addressed by name (see `option_names()`)."""
    model: str | None = _opt(None, "HF model directory, .gguf file or preset name; None: the default "
                                   "SmolLM2-135M-Instruct")
    load_format: LoadFormat = _opt(LoadFormat.AUTO, "auto (by the path), safetensors, gguf, or dummy "
                                                    "(random weights at the model's architecture)")
    dtype: DType = _opt(DType.AUTO, "the model's dtype; auto: float32 on a CPU, bfloat16 on CUDA. On a CPU "
                                    "with AMX or AVX-512 bf16, bfloat16 decodes about twice as fast")
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    seed: int = _opt(0, "engine sampling seed")
    max_model_len: int | None = _opt(None, "context length cap; None: the model's")
    attention_backend: AttentionBackend = _opt(AttentionBackend.AUTO, "auto (triton on CUDA with Triton, "
                                                                      "else torch), torch or triton")
    cuda_graph: bool = _opt(True, "capture decode steps in CUDA graphs (eager when off)")
    cuda_graph_max_bs: int | None = _opt(None, "largest decode batch captured in a CUDA graph; "
                                               "None: max_running_requests")
    memory_saver: Switch = _opt(Switch.OFF, "release weights and KV (release_memory) through torch-memory-saver, "
                                            "keeping addresses and CUDA graphs (on; auto: on CUDA when installed); "
                                            "off: the engine's own release, which captures graphs again. Its "
                                            "regions cannot be shared as CUDA IPC handles")
    compile: Elementwise = _opt(Elementwise.AUTO, "how norms, rotary and the gated activation run: triton "
                                "kernels, inductor (torch.compile) or eager torch ops; auto: triton on CUDA with "
                                "Triton, inductor on CUDA without, eager on a CPU")
    overlap_schedule: Switch = _opt(Switch.AUTO, "overlap the host's work with the device's step; auto: on CUDA")
    tokenizer: str | None = _opt(None, "tokenizer directory; None: the model's")
    kv_cache_dtype: KVCacheDtype = _opt(KVCacheDtype.AUTO, "auto (the model's dtype) or fp8_e4m3 (scaled per "
                                                           "token and head; half the KV bytes)")
    cascade_attention: bool = _opt(False, "decode requests continuing one cached prefix read it once per step "
                                          "(triton backend with the radix cache); off by default: it captures "
                                          "a second set of decode graphs and helps only shared-prefix traffic")
    fp32_logits: bool = _opt(True, "a 16-bit model's lm_head writes float32 logits (off: 16-bit logits, "
                                   "where near-equal tokens tie; no speed difference was measured)")
    warmup: bool = _opt(True, "on CUDA, run each prefill size once at start, so the first requests don't "
                              "pay CUDA's lazy kernel loading")
    grammar_helpers: int | None = _opt(None, "helper processes that fill structured-output masks; 0: none "
                                             "(the loop fills them); None: the engine picks for the device")
    pooling: str | None = _opt(None, "embeddings' pooling: last (the last token) or mean, normalised; None: "
                                     "the model's sentence-transformers pooling config, else last")
    tensor_parallel_size: int = _opt(1, "ranks the model is split over (one process each; on CUDA one GPU "
                                        "each, from the device asked for on)")
    quantization: str | None = _opt(None, "quantize the projections' weights after loading: int8 or int4 "
                                          "(weight-only, CPU kernels; lm_head too, in int8), fp8 (e4m3, CUDA; an FP8 "
                                          "checkpoint's own codes), or gguf (a Q4_0/Q4_1 GGUF's own 4-bit codes, "
                                          "as int4). Embeddings stay float. None: float weights (an FP8 "
                                          "checkpoint runs fp8 on a GPU with FP8 tensor cores)")
    quantization_group_size: int = _opt(32, "input channels per int4 scale (32, 64, 128 or 256; must divide "
                                            "every projection's input size)")
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("model", "tokenizer"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                set_(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a path or a name; got {value!r}")
        # Legacy spellings: compile=True/False (torch.compile or eager), overlap_schedule=True/False,
        # dtype="bf16", kv_cache_dtype="fp8".
        set_(self, "compile", Elementwise.coerce(self.compile, "compile",
                                                 {True: Elementwise.INDUCTOR, False: Elementwise.EAGER}))
        set_(self, "overlap_schedule", Switch.coerce(self.overlap_schedule, "overlap_schedule",
                                                     {True: Switch.ON, False: Switch.OFF}))
        set_(self, "memory_saver", Switch.coerce(self.memory_saver, "memory_saver",
                                                 {True: Switch.ON, False: Switch.OFF}))
        set_(self, "dtype", DType.coerce(self.dtype, "dtype", _DTYPE_ALIASES))
        set_(self, "load_format", LoadFormat.coerce(self.load_format, "load_format"))
        set_(self, "attention_backend", AttentionBackend.coerce(self.attention_backend, "attention_backend"))
        set_(self, "kv_cache_dtype", KVCacheDtype.coerce(self.kv_cache_dtype, "kv_cache_dtype",
                                                         {"fp8": KVCacheDtype.FP8_E4M3}))
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")
        _check_int("max_model_len", self.max_model_len, 1, optional=True)
        _check_int("cuda_graph_max_bs", self.cuda_graph_max_bs, 1, optional=True)
        _check_int("grammar_helpers", self.grammar_helpers, 0, optional=True)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        if self.quantization not in (None, "int8", "int4", "fp8", "gguf"):
            raise ValueError(f"quantization must be int8, int4 or fp8 (or gguf: a GGUF's own 4-bit codes); "
                             f"got {self.quantization!r}")
        _check_int("quantization_group_size", self.quantization_group_size, 1)
        if self.pooling not in (None, "last", "mean"):
            raise ValueError(f"pooling must be last or mean; got {self.pooling!r}")
        for flag in ("cuda_graph", "cascade_attention", "fp32_logits", "warmup"):
            _check_bool(self, flag)
        if not isinstance(self.cache, CacheConfig) or not isinstance(self.scheduler, SchedulerConfig):
            raise ValueError("cache and scheduler must be a CacheConfig and a SchedulerConfig")

    # ---- options by name ----
    def with_options(self, **options: Any) -> EngineConfig:
        """A copy with options changed by their plain names: any field of EngineConfig, CacheConfig or
        SchedulerConfig (`dtype=`, `max_total_tokens=`, `policy=`), or an alias (`schedule_policy=`);
        `cache=`/`scheduler=` take a whole section. Unknown names raise a TypeError listing the valid ones."""
        unknown = sorted(set(options) - set(option_names()) - set(_SECTIONS))
        if unknown:
            raise TypeError(f"unknown engine option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"valid options: {', '.join(option_names())}")
        top: dict[str, Any] = {}
        sections: dict[str, Any] = {"cache": self.cache, "scheduler": self.scheduler}
        nested: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for name, cls in _SECTIONS.items():
            given_section = options.get(name)
            if isinstance(given_section, Mapping):     # a section's options by name (a YAML mapping)
                valid = [f.name for f in fields(cls)]
                bad = sorted(set(given_section) - set(valid))
                if bad:
                    raise TypeError(f"unknown {name} option {', '.join(bad)}; valid: {', '.join(valid)}")
                nested[name].update(given_section)
            elif given_section is not None:
                sections[name] = given_section
        for given, value in options.items():
            name = _ALIASES.get(given, given)
            if name in _SECTIONS:
                continue
            owner = _OWNER[name]
            target = top if owner is None else nested[owner]
            if name in target:
                raise TypeError(f"engine option {name!r} given twice (as {given!r} too)")
            target[name] = value
        for section, changes in nested.items():
            if changes:
                sections[section] = replace(sections[section], **changes)
        return replace(self, **top, **sections)

    def to_options(self) -> dict[str, Any]:
        """Every option by its plain name, enums as their string values (the inverse of with_options)."""
        out: dict[str, Any] = {}
        for name, owner in _OWNER.items():
            value = getattr(self if owner is None else getattr(self, owner), name)
            out[name] = value.value if isinstance(value, Choice) else value
        return out


_SECTIONS: dict[str, type] = {"cache": CacheConfig, "scheduler": SchedulerConfig}
# Other names LLM(...) has long taken for an option.
_ALIASES = {"schedule_policy": "policy"}


def _owners() -> dict[str, str | None]:
    """Option name → the section holding it (None: EngineConfig itself). Names are unique across sections."""
    owners: dict[str, str | None] = {f.name: None for f in fields(EngineConfig) if f.name not in _SECTIONS}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            if f.name in owners:
                raise TypeError(f"option {f.name!r} of {cls.__name__} shadows another option of the same name")
            owners[f.name] = section
    return owners


_OWNER = _owners()


def option_names() -> tuple[str, ...]:
    """Every name an option goes by: the fields of EngineConfig and its sections, then the aliases."""
    return (*_OWNER, *_ALIASES)


def option_help(name: str) -> str:
    """The description of an option (its field's `help` metadata)."""
    name = _ALIASES.get(name, name)
    owner = _OWNER[name]
    cls = EngineConfig if owner is None else _SECTIONS[owner]
    return str(next(f for f in fields(cls) if f.name == name).metadata.get("help", ""))
