"""Typed configuration, layered model → cache → scheduler → engine."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class Switch(str, Enum):
    """A feature that is on, off, or chosen by the engine for its device (AUTO)."""
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Elementwise(str, Enum):
    """How the elementwise chains (norms, rotary, the gated activation) run: Triton kernels on CUDA,
    torch.compile (inductor), or eager torch ops; AUTO is TRITON on CUDA with Triton, INDUCTOR on CUDA
    without it, EAGER on a CPU."""
    AUTO = "auto"
    TRITON = "triton"
    INDUCTOR = "inductor"
    EAGER = "eager"


ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


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

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Build from a transformers PretrainedConfig (v4 or v5 layout)."""
        archs = getattr(hf, "architectures", None) or []
        arch = archs[0] if archs else _ARCH_BY_TYPE.get(getattr(hf, "model_type", ""), "")
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
            bos_token_id=getattr(hf, "bos_token_id", None),
        )


_ARCH_BY_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class CacheConfig:
    # CPU: a byte budget for the KV pool. GPU: a fraction of free memory after weights.
    kv_cache_bytes: int = 256 << 20
    gpu_memory_fraction: float = 0.85
    max_total_tokens: int | None = None     # overrides both budgets when set (tests use it)
    enable_radix_cache: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int = 256
    # Per-step prefill token budget; None → 8192 on CUDA (fewer, fuller prefill steps amortise the
    # per-step host cost) and 2048 on CPU (keeps decode steps from waiting behind long prefills).
    chunked_prefill_size: int | None = None
    policy: str = "fcfs"                    # "fcfs" | "lpm"
    init_new_token_ratio: float = 0.7       # fraction of max_new_tokens reserved at admission
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001    # per decode step
    retract_ratio_step: float = 0.1         # how much a retraction raises the ratio
    max_waiting_requests: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "lpm"):
            raise ValueError(f"unknown scheduling policy {self.policy!r}; choose fcfs or lpm")
        if (self.chunked_prefill_size is not None and self.chunked_prefill_size < 1) or self.max_running_requests < 1:
            raise ValueError("chunked_prefill_size and max_running_requests must be positive")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None                # None → the default SmolLM2; path, .gguf, or preset name
    load_format: str = "auto"               # "auto" | "safetensors" | "gguf" | "dummy"
    dtype: str = "auto"                     # "auto" → float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    attention_backend: str = "auto"         # "torch" | "triton" | "auto"
    cuda_graph: bool = True                 # capture decode graphs on CUDA (eager when False)
    cuda_graph_max_bs: int | None = None    # largest captured decode batch; None: max_running_requests
    # Elementwise chains (norms, rotary, gated activation): "triton" runs Triton kernels for CUDA inputs,
    # True fuses them with torch.compile, False leaves them eager; "auto" is "triton" on CUDA, eager on CPU.
    compile: Elementwise = Elementwise.AUTO
    overlap_schedule: Switch = Switch.AUTO  # AUTO: overlap host work with the device on CUDA
    tokenizer: str | None = None
    kv_cache_dtype: str = "auto"            # "auto" (the model's dtype) | "fp8_e4m3" (scaled, half the bytes)
    # Read a prefix shared by decode requests once per step (triton + radix cache). Off by default: its
    # first H100 measurement was slower than plain decode (docs/benchmarks.md, "Serving").
    cascade_attention: bool = False
    fp32_logits: bool = True                # lm_head writes float32 logits from a 16-bit model (layers/logits.py)
    warmup: bool = True                     # on CUDA, run each prefill size once at start (Engine.warm_up)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        # Legacy spellings (compile=True/False/"triton", overlap_schedule=True/False) map onto the enums.
        legacy_compile = {True: Elementwise.INDUCTOR, False: Elementwise.EAGER}
        compile_ = legacy_compile.get(self.compile, self.compile) if isinstance(self.compile, bool) else self.compile
        overlap = self.overlap_schedule
        if isinstance(overlap, bool):
            overlap = Switch.ON if overlap else Switch.OFF
        try:
            object.__setattr__(self, "compile", Elementwise(compile_))
            object.__setattr__(self, "overlap_schedule", Switch(overlap))
        except ValueError as e:
            raise ValueError(f"invalid engine option: {e}") from None


def engine_config(model: str | None = None, *, load_format: str = "auto", dtype: str = "auto",
                  device: str = "auto", seed: int = 0, max_model_len: int | None = None,
                  tokenizer: str | None = None, attention_backend: str = "auto",
                  enable_radix_cache: bool = True, kv_cache_bytes: int | None = None,
                  gpu_memory_fraction: float = 0.85, max_total_tokens: int | None = None,
                  max_running_requests: int = 256, chunked_prefill_size: int | None = None,
                  schedule_policy: str = "fcfs", cuda_graph: bool = True, cuda_graph_max_bs: int | None = None,
                  overlap_schedule: bool | str = "auto", compile: bool | str = "auto",
                  kv_cache_dtype: str = "auto", cascade_attention: bool = False,
                  fp32_logits: bool = True, warmup: bool = True) -> EngineConfig:
    """The layered EngineConfig from flat keyword arguments (what LLM(...) and the CLI flags take)."""
    cache = CacheConfig(enable_radix_cache=enable_radix_cache, gpu_memory_fraction=gpu_memory_fraction,
                        max_total_tokens=max_total_tokens)
    if kv_cache_bytes is not None:
        cache = replace(cache, kv_cache_bytes=kv_cache_bytes)
    sched = SchedulerConfig(max_running_requests=max_running_requests,
                            chunked_prefill_size=chunked_prefill_size, policy=schedule_policy)
    return EngineConfig(model=model, load_format=load_format, dtype=dtype, device=device, seed=seed,
                        max_model_len=max_model_len, tokenizer=tokenizer, attention_backend=attention_backend,
                        cuda_graph=cuda_graph, cuda_graph_max_bs=cuda_graph_max_bs,
                        overlap_schedule=overlap_schedule, compile=compile, kv_cache_dtype=kv_cache_dtype,
                        cascade_attention=cascade_attention, fp32_logits=fp32_logits, warmup=warmup, cache=cache,
                        scheduler=sched)
