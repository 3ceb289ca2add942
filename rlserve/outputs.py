"""Results handed back to users (vLLM-shaped)."""
from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: token id → logprob, the chosen token first, then the top-k alternatives.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None        # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None    # the stop string or token id that ended it
    # (first token index, weight version) per run of token_ids sampled under one weight version, starts
    # ascending from 0: ((0, "v1"), (5, "v2")) means tokens 0..4 came from "v1" and 5.. from "v2".
    weight_version_spans: tuple[tuple[int, str], ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    cached_tokens: int = 0
    embedding: list[float] | None = None    # a pooling request's result: an embedding or classification scores

    @property
    def finished(self) -> bool:
        for o in self.outputs:    # a plain loop: read for every running request on every step
            if o.finish_reason is None:
                return False
        return True
