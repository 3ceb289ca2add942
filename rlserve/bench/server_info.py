"""What the serving benchmark asks of the server besides completions, none of it required.

rlserve answers /get_model_info (vocabulary size, context length), /flush_cache and /get_server_info
(device, dtype, KV bookkeeping); other OpenAI-compatible servers may have none of these. Then the
vocabulary to draw prompt ids from comes from --vocab-size or --tokenizer, the context length from
/v1/models where the server lists it (vLLM and rlserve do), a flush is skipped with a note, and the
record simply lacks the server's state.
"""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

FLUSH_RETRIES = 20          # the flush route refuses while requests still hold the cache
ABSENT = (404, 405)         # no such route (405: the path exists for another method)


@dataclass(frozen=True)
class ServerInfo:
    vocab_size: int                 # prompt ids are drawn below this
    max_model_len: int | None       # None: the server does not say, requests are not checked against it
    model: str | None               # the first model /v1/models lists, sent when --model is not given
    record: dict[str, Any]          # what the run's JSON record keeps about the server


async def _get_optional(client: httpx.AsyncClient, path: str) -> dict[str, Any] | None:
    """The route's JSON, or None where the server has no such route."""
    r = await client.get(path)
    if r.status_code in ABSENT:
        return None
    r.raise_for_status()
    return r.json()


def tokenizer_vocab_size(name: str) -> int:
    """Token ids a tokenizer can produce: its base vocabulary plus added tokens."""
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(name))
    except OSError as e:     # not a tokenizer directory, or a name not in the local cache (offline)
        raise ValueError(f"--tokenizer {name!r} could not be loaded: {e}") from None


async def server_info(client: httpx.AsyncClient, vocab_size: int | None = None,
                      tokenizer: str | None = None) -> ServerInfo:
    """The vocabulary: --vocab-size, else --tokenizer's, else the server's /get_model_info."""
    info = await _get_optional(client, "/get_model_info") or {}
    listed = await _get_optional(client, "/v1/models") or {}
    cards = listed.get("data") or []
    card = cards[0] if cards and isinstance(cards[0], dict) else {}
    if vocab_size is None and tokenizer is not None:
        vocab_size = await asyncio.to_thread(tokenizer_vocab_size, tokenizer)
    vocab = vocab_size or info.get("vocab_size")
    if not vocab:
        raise ValueError("the server has no /get_model_info route to give its vocabulary size: pass "
                         "--vocab-size N or --tokenizer NAME")
    max_len = info.get("max_model_len") or card.get("max_model_len")
    model = card.get("id")
    record = {"served_model_name": info.get("served_model_name", model), "model_path": info.get("model_path"),
              "max_model_len": max_len, "vocab_size": vocab}
    return ServerInfo(vocab, max_len, model, record)


async def flush_cache(client: httpx.AsyncClient) -> bool:
    """Drop the server's prefix cache; False (with a note) where the server has no /flush_cache.

    rlserve's route refuses (400) while requests still hold the cache, so a refusal is retried briefly."""
    for _ in range(FLUSH_RETRIES):
        r = await client.post("/flush_cache")
        if r.status_code == 200:
            return True
        if r.status_code in ABSENT:
            print("note: the server has no /flush_cache route; the run starts with whatever its prefix cache "
                  "holds", file=sys.stderr)
            return False
        await asyncio.sleep(0.5)
    raise ValueError(f"the server would not flush its cache: HTTP {r.status_code} {r.text[:200]}")


async def server_state(client: httpx.AsyncClient) -> dict[str, Any]:
    """Device, dtype and KV bookkeeping after the run (kv_leaked should be 0); {} if unavailable."""
    try:
        r = await client.get("/get_server_info")
        r.raise_for_status()
        info = r.json()
    except Exception:     # an older or different server: the record just lacks these
        return {}
    return {k: info[k] for k in ("device", "dtype", "kv_total", "kv_leaked") if k in info}
