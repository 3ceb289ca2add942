"""SamplingParams: validated on construction so bad values never reach the engine."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0                # 0 → greedy
    top_k: int = -1                         # -1 or 0 → off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0         # HF style, over prompt and output tokens
    frequency_penalty: float = 0.0          # OpenAI style, over output tokens
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16             # None → up to the context length
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None             # number of top alternatives besides the sampled token
    # "raw": logprobs of the model's distribution (vLLM's default); "tempered": of softmax(logits / T),
    # the distribution the tokens were drawn from (what an RL trainer recomputes).
    logprobs_mode: str = "raw"
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Structured output (at most one): a JSON schema (dict or JSON text), any JSON object, a regex, EBNF.
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    ebnf: str | None = None
    # Added to the named tokens' logits before sampling in every mode (greedy too) and before grammar masks;
    # OpenAI's range, [-100, 100] (-100 bans a token in effect, 100 all but forces it).
    logit_bias: dict[int, float] | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                bad(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")
        if self.logprobs_mode not in ("raw", "tempered"):
            bad(f"logprobs_mode must be 'raw' or 'tempered', got {self.logprobs_mode!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            bad("stop must be a non-empty string or a list of non-empty strings")
        self.stop_strings = stops
        if self.stop_token_ids is not None and any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(t): float(b) for t, b in dict(self.logit_bias).items()}
            except (TypeError, ValueError):
                bad("logit_bias must map token ids to numbers")
            for t, b in self.logit_bias.items():
                if t < 0 or not -100 <= b <= 100:
                    bad(f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {t}: {b}")
            self.logit_bias = self.logit_bias or None
        if self.top_k == 0:
            self.top_k = -1
        constraints = [n for n in ("json_schema", "regex", "ebnf") if getattr(self, n) is not None]
        constraints += ["json_object"] if self.json_object else []
        if len(constraints) > 1:
            bad(f"use one structured-output constraint at a time, got {', '.join(constraints)}")
        if isinstance(self.json_schema, str):
            try:
                parsed = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                bad(f"json_schema is not valid JSON: {e}")
            if not isinstance(parsed, (dict, bool)):
                bad("json_schema must be a JSON object")
        elif self.json_schema is not None and not isinstance(self.json_schema, dict):
            bad("json_schema must be a dict or a JSON string")
        for name in ("regex", "ebnf"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                bad(f"{name} must be a non-empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
