"""EngineStatus: everything outside the engine reads the engine's state through this one typed value
(the server's /get_server_info and metrics, the benchmarks, RL and the tests), never scheduler or
allocator attributes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoopCounters:
    """Counted since the engine started (or since warm-up, which resets them)."""
    prompt_tokens: int = 0           # prompt tokens computed (cached ones excluded)
    generation_tokens: int = 0       # tokens sampled and kept
    cached_tokens: int = 0           # prompt tokens served from the prefix cache (finished requests)
    prefill_steps: int = 0
    decode_steps: int = 0
    overlapped_steps: int = 0        # decode steps launched before the previous step's tokens were read
    overlapped_prefills: int = 0     # prefill steps whose first tokens were read one step later
    device_wait_s: float = 0.0       # host time spent waiting for an overlapped step's tokens


@dataclass(frozen=True)
class EngineStatus:
    running: int                     # requests decoding (a prompt being chunked counts as running)
    waiting: int                     # requests queued for admission (retracted ones included)
    chunked: bool                    # a long prompt is part-way through chunked prefill
    retractions: int                 # requests sent back to waiting because the KV pool ran dry
    kv_total: int                    # KV slots in the pool (tokens)
    kv_free: int                     # slots neither held by a request nor by the prefix cache
    kv_cached: int                   # slots held by the prefix cache
    kv_evictable: int                # cached slots no running request holds (reclaimable)
    kv_leaked: int                   # slots owned by nobody: always 0 unless there is a bug
    weight_version: str              # set by weight updates; "default" until the first one
    device: str
    dtype: str                       # the model's dtype, e.g. "bfloat16"
    kv_dtype: str
    max_model_len: int
    in_flight: bool                  # an overlapped step is on the device, to be read by the next step()
    released: tuple[str, ...]        # memory tags released now ("kv_cache", "weights"); () when resident
    paused: str | None = None        # the pause mode ("abort" | "retract" | "in_place"); None while generating
    counters: LoopCounters = field(default_factory=LoopCounters)

    @property
    def kv_usage(self) -> float:
        return 1 - self.kv_free / self.kv_total if self.kv_total else 0.0
