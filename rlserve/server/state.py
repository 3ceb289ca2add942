"""What every route shares: the engine client, metrics, server arguments and lifecycle flags."""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from rlserve.config import EngineConfig
from rlserve.sampling import SamplingParams
from rlserve.server.errors import APIError
from rlserve.server.frontend import EngineClient
from rlserve.server.metrics import Metrics

LOGPROB_FLOOR = -9999.0   # JSON has no -inf


@dataclass
class ServerArgs:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting_requests: int | None = 1024
    drain_timeout: float = 30.0
    max_body_bytes: int = 8 << 20
    max_prompts_per_request: int = 256
    log_level: str = "info"


@dataclass
class ServerState:
    args: ServerArgs
    client: EngineClient
    metrics: Metrics
    model_name: str
    draining: bool = False

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, self.args.engine.model):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finite(x: float) -> float:
    return LOGPROB_FLOOR if math.isnan(x) or x < LOGPROB_FLOOR else float(x)


def validated(params: dict[str, Any]) -> dict[str, Any]:
    """Build SamplingParams once here so bad values come back as a 400 before reaching the engine."""
    try:
        SamplingParams(**params)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from e
    return params


def model_name_for(args: ServerArgs) -> str:
    if args.served_model_name:
        return args.served_model_name
    model = args.engine.model
    if model is None:
        from rlserve.models.default import DEFAULT_MODEL_NAME
        return DEFAULT_MODEL_NAME
    return model.rstrip("/").rsplit("/", 1)[-1]


def engine_config(model: str | None = None, *, load_format: str = "auto", dtype: str = "auto",
                  device: str = "auto", seed: int = 0, max_model_len: int | None = None,
                  tokenizer: str | None = None, attention_backend: str = "auto", enable_radix_cache: bool = True,
                  kv_cache_bytes: int | None = None, gpu_memory_fraction: float = 0.85,
                  max_total_tokens: int | None = None, max_running_requests: int = 256,
                  chunked_prefill_size: int = 2048, schedule_policy: str = "fcfs") -> EngineConfig:
    """EngineConfig from the same keyword arguments LLM(...) takes (what the CLI's engine flags produce)."""
    from dataclasses import replace

    from rlserve.config import CacheConfig, SchedulerConfig
    cache = CacheConfig(enable_radix_cache=enable_radix_cache, gpu_memory_fraction=gpu_memory_fraction,
                        max_total_tokens=max_total_tokens)
    if kv_cache_bytes is not None:
        cache = replace(cache, kv_cache_bytes=kv_cache_bytes)
    sched = SchedulerConfig(max_running_requests=max_running_requests, chunked_prefill_size=chunked_prefill_size,
                            policy=schedule_policy)
    return EngineConfig(model=model, load_format=load_format, dtype=dtype, device=device, seed=seed,
                        max_model_len=max_model_len, tokenizer=tokenizer, attention_backend=attention_backend,
                        cache=cache, scheduler=sched)
