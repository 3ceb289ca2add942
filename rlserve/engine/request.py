"""A request's state as it moves waiting → running → finished (possibly back to waiting on retraction)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from rlserve.sampling import SamplingParams


@dataclass(eq=False)
class Request:
    rid: str                                  # unique per sample; "<group>" or "<group>-<index>" for n > 1
    group: str                                # the user's request id (shared by the n samples)
    index: int                                # which of the n samples
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    arrival: int                              # admission order tie-breaker
    generator: random.Random | None = None      # the seeded stream when params carry a seed
    detokenizer: Any = None
    prompt: str | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # KV bookkeeping: row[:kv_len] of the req-to-token table holds written KV; row[:cached_len] belongs to
    # the radix tree (protected by a lock on last_node), the rest to this request.
    row: int | None = None
    kv_len: int = 0
    cached_len: int = 0
    last_node: Any = None
    cached_tokens: int = 0                    # prompt tokens served from the prefix cache (first admission)
    admitted_once: bool = False
    chunk_len: int = 0                        # tokens being prefilled in the current step
    decode_row: Any = None                    # its SampleRow for overlapped decode steps, made once
    # (first output token index, weight version) for each run of output tokens sampled under one version,
    # starts ascending from 0. A tuple replaced (never mutated) on change: an output can share it, and a
    # changed one is told apart by identity.
    weight_version_spans: tuple[tuple[int, str], ...] = ()
    # Pooling requests (engine/pooling.py): their PoolingParams, the running sum of a mean pooling across
    # chunks, and the result (an embedding or classification scores).
    pooling: Any = None
    pool_sum: Any = None
    pooled: list[float] | None = None

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose KV must exist before the next one can be sampled."""
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def constrained(self) -> bool:
        """Whether its output must match a grammar (its masks need every earlier token taken first)."""
        p = self.params
        return p.json_schema is not None or p.json_object or p.regex is not None or p.ebnf is not None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def remaining_new_tokens(self) -> int:
        return max(self.max_new_tokens - len(self.output_ids), 0)

    def note_weight_version(self, version: str) -> None:
        """The tokens sampled from now on are `version`'s: a span starts at the next output token. A span
        that holds no token yet is replaced, and one that would repeat the previous version is not opened."""
        spans, at = self.weight_version_spans, len(self.output_ids)
        if spans and spans[-1][0] == at:
            spans = spans[:-1]
        if not spans or spans[-1][1] != version:
            spans = (*spans, (at, version))
        self.weight_version_spans = spans
