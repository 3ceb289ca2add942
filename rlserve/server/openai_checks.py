"""Checks of /v1 bodies beyond their schema: what depends on the model (its vocabulary, its context) or
on several fields together, and the fields rlserve does not know."""
from __future__ import annotations

import logging
from typing import Any

from rlserve.server.errors import APIError
from rlserve.server.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("rlserve.server")
_warned: set[str] = set()      # unknown field names already logged (once each, not per request)


def warn_unknown_fields(req: CompletionRequest | ChatCompletionRequest) -> None:
    for name in req.model_extra or {}:
        if name not in _warned:
            _warned.add(name)
            log.warning("ignoring the unknown request field %r (logged once for this field)", name)


def check_request(req: CompletionRequest | ChatCompletionRequest, vocab: int) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    for name, ids in (("logit_bias", list(req.logit_bias or ())), ("stop_token_ids", req.stop_token_ids or [])):
        for t in ids:
            if not 0 <= t < vocab:
                raise APIError(400, f"{name}: token id {t} is out of range for a vocabulary of {vocab}",
                               param=name)


def check_room(prompt_len: int, max_tokens: int | None, limit: int, param: str) -> None:
    """A max_tokens that the context can't hold is refused, as the prompt that is too long is (a default
    max_tokens is clamped to the room left instead)."""
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens, but {prompt_len + max_tokens}"
                       f" were requested ({prompt_len} in the prompt, {max_tokens} in {param}); lower {param}",
                       param=param)


def constraint_params(req: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """SGLang's `regex` / `ebnf` body fields as sampling constraints (one constraint in all: a second,
    such as a response_format too, is refused when the params are validated)."""
    return {name: getattr(req, name) for name in ("regex", "ebnf") if getattr(req, name) is not None}
