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
    drain_timeout: float = 30.0
    max_body_bytes: int = 8 << 20
    max_prompts_per_request: int = 256
    log_level: str = "info"
    tool_call_parser: str = "auto"           # "auto" (from the architecture) | "qwen" | "llama3"
    admin_api_key: str | None = None         # the key of the admin routes (weights, memory, pause, ...)
    profile_dir: str | None = None           # where /stop_profile writes traces; None turns profiling off
    logprobs_mode: str = "raw"               # /generate's logprobs_mode when a request does not say


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


