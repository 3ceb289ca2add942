"""Log-probabilities and echoed prompts in OpenAI's shapes (/v1/completions' legacy form and chat's)."""
from __future__ import annotations

from typing import Any

from rlserve.server.frontend import EngineClient, RequestResult
from rlserve.server.state import finite

LOGPROB_MISSING = float("-inf")


def _top(d: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])[:k]


def echo_text(client: EngineClient, text: str | None, ids: list[int]) -> str:
    """The echoed prompt: its text as sent, or a token-id prompt decoded with its special tokens (the
    tokens that `logprobs.tokens` lists, so the text and the offsets agree)."""
    return text if text is not None else client.decode(ids, skip_special_tokens=False)


def completion_logprobs(client: EngineClient, tokens: list[int], lps: list[dict[int, float]] | None, k: int,
                        offset: int, end: int) -> tuple[dict[str, list], int]:
    """The legacy logprobs of `tokens` from text offset `offset`: each entry's top_logprobs holds the k most
    likely tokens and always the sampled one (up to k + 1 entries; k = 0 gives the sampled token alone), as
    OpenAI's legacy API does. Offsets never pass `end`, the length of the choice's text: a token's text
    alone can be longer than what it adds to the decoded text (a byte of a character, a leading space)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, d in zip(tokens, lps or []):
        s = client.token_str(tok)
        top = _top(d, k)
        if tok in d and all(a != tok for a, _ in top):
            top.append((tok, d[tok]))
        out["tokens"].append(s)
        out["token_logprobs"].append(finite(d.get(tok, LOGPROB_MISSING)))
        out["top_logprobs"].append({client.token_str(a): finite(lp) for a, lp in top})
        out["text_offset"].append(min(offset, end))
        offset += len(s)
    return out, offset


def echo_logprobs(client: EngineClient, res: RequestResult, k: int, end: int) -> tuple[dict[str, list], int]:
    """The prompt's entries (the first token has no logprob: nothing predicts it), offsets within `end`,
    the echoed prompt's length; and the offset where the completion's tokens start (that length)."""
    ids, plps = res.prompt_ids, res.prompt_logprobs or []
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for i, tok in enumerate(ids):
        d = plps[i] if i < len(plps) else None
        s = client.token_str(tok)
        out["tokens"].append(s)
        out["text_offset"].append(min(offset, end))
        offset += len(s)
        if d is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            top = _top(d, k)
            if tok in d and all(a != tok for a, _ in top):
                top.append((tok, d[tok]))
            out["token_logprobs"].append(finite(d.get(tok, LOGPROB_MISSING)))
            out["top_logprobs"].append({client.token_str(a): finite(lp) for a, lp in top})
    return out, end


def chat_logprobs(client: EngineClient, tokens: list[int], lps: list[dict[int, float]] | None,
                  k: int) -> dict[str, list]:
    def entry(s: str, lp: float) -> dict[str, Any]:
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}
    content = []
    for tok, d in zip(tokens, lps or []):
        s = client.token_str(tok)
        content.append({**entry(s, finite(d.get(tok, LOGPROB_MISSING))),
                        "top_logprobs": [entry(client.token_str(a), finite(lp)) for a, lp in _top(d, k)]})
    return {"content": content}
