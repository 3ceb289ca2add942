"""llama.cpp as the same-run peer of the CPU decode benchmark, on the very GGUF the default model comes
from (SmolLM2-135M-Instruct Q4_1), through llama-cpp-python's low-level API (`pip install rlserve[llamacpp]`,
built from source: `CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"`; on a CPU with AMX where its AMX
kernels fault in llama_decode, as in some VMs, also set CFLAGS and CXXFLAGS to
`-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`).

Two figures, both greedy (argmax over the logits) and both timing the decode phase only, prefill excluded:
- batch 1: one sequence on cpu_decode.py's prompt, one token per llama_decode call;
- N concurrent: N sequences (each its own seq_id) with a prompt of 24 tokens each, prefilled together,
  then every step one llama_decode over one token per sequence; output tok/s summed over the sequences.

`python benchmarks/llama_cpp_peer.py --tokens 128 --concurrent 32` (threads: torch's count by default,
the same as the rlserve and transformers figures beside it). llama_cpp is imported only inside functions,
so this module imports without it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 24          # each concurrent sequence's prompt
# Room per sequence (24 prompt + 128 decode steps + the first sampled token fit in 160); llama.cpp pads each
# sequence's KV stream to a multiple of 256 anyway, so ask for that and skip its rounding warning.
CTX_PER_SEQ = 256


def default_gguf() -> Path:
    from rlserve.models.default import _default_gguf

    return _default_gguf()


@dataclass
class Session:
    """A loaded model and one context sized for `n_seq` sequences of `ctx_per_seq` positions each."""
    lib: Any
    model: Any
    ctx: Any
    vocab: Any
    n_vocab: int


@contextmanager
def session(gguf: Path, n_threads: int, n_seq: int, ctx_per_seq: int, n_batch: int) -> Iterator[Session]:
    import logging

    import llama_cpp as lib

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)   # llama.cpp's load log goes to stderr
    lib.llama_backend_init()
    mp = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(str(gguf).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    cp = lib.llama_context_default_params()
    cp.n_ctx = n_seq * ctx_per_seq
    cp.n_seq_max = n_seq
    # One KV stream per sequence (n_ctx split evenly): each sequence attends over its own cells only,
    # as in llama-batched-bench's default; a unified buffer would mask over every sequence's cells.
    cp.kv_unified = False
    cp.n_batch = cp.n_ubatch = max(512, n_batch)
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.no_perf = True
    ctx = lib.llama_init_from_model(model, cp)
    if not ctx:
        lib.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create a context")
    vocab = lib.llama_model_get_vocab(model)
    try:
        yield Session(lib, model, ctx, vocab, lib.llama_vocab_n_tokens(vocab))
    finally:
        lib.llama_free(ctx)
        lib.llama_model_free(model)


def tokenize(s: Session, text: str) -> list[int]:
    raw = text.encode()
    buf = (s.lib.llama_token * (len(raw) + 8))()
    n = s.lib.llama_tokenize(s.vocab, raw, len(raw), buf, len(buf), True, False)
    if n < 0:
        raise RuntimeError("llama_tokenize: buffer too small")
    return list(buf[:n])


def decode_tok_s(s: Session, prompts: list[list[int]], steps: int) -> float:
    """Prefill every prompt in one batch, then time `steps` decode steps of one token per sequence;
    returns output tokens per second of those steps (len(prompts) * steps / time)."""
    import numpy as np

    lib, n = s.lib, len(prompts)
    lib.llama_memory_clear(lib.llama_get_memory(s.ctx), True)
    batch = lib.llama_batch_init(max(n, sum(map(len, prompts))), 0, 1)
    try:
        def run(entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
            """entries: (token, pos, seq_id, want logits); returns the argmax of each logits row, in order."""
            for i, (tok, pos, seq, out) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.logits[i] = tok, pos, int(out)
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
            batch.n_tokens = len(entries)
            if (rc := lib.llama_decode(s.ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            # The context's logits buffer holds one row per requested output, in batch order.
            ptr = ctypes.cast(lib.llama_get_logits(s.ctx), ctypes.POINTER(ctypes.c_float))
            return np.ctypeslib.as_array(ptr, shape=(n, s.n_vocab)).argmax(axis=1)

        nxt = run([(t, p, seq, p == len(ids) - 1) for seq, ids in enumerate(prompts) for p, t in enumerate(ids)])
        start = time.perf_counter()
        for step in range(steps):
            nxt = run([(int(nxt[seq]), len(ids) + step, seq, True) for seq, ids in enumerate(prompts)])
        return n * steps / (time.perf_counter() - start)
    finally:
        lib.llama_batch_free(batch)


@contextmanager
def batch1_peer(prompt: str, tokens: int, n_threads: int, gguf: Path | None = None) -> Iterator[Callable[[], float]]:
    """A loaded model and a function timing one batch-1 greedy decode window of `tokens` steps on
    `prompt` (prefill excluded; each window starts from an empty cache), after a short warm-up."""
    with session(gguf or default_gguf(), n_threads, 1, 512 + tokens, 512) as s:
        ids = tokenize(s, prompt)
        decode_tok_s(s, [ids], 8)                                               # warm-up
        yield lambda: decode_tok_s(s, [ids], tokens)


@contextmanager
def concurrent_peer(text: str, n_seq: int, tokens: int, n_threads: int, gguf: Path | None = None,
                    prompt_tokens: int = PROMPT_TOKENS) -> Iterator[Callable[[], float]]:
    """`n_seq` sequences decoded together (one llama_decode per step, one token per sequence), each with
    its own `prompt_tokens`-token prompt cut from `text`: a function timing one window's decode-phase
    output tok/s over all sequences."""
    ctx_per_seq = max(CTX_PER_SEQ, prompt_tokens + tokens + 8)
    with session(gguf or default_gguf(), n_threads, n_seq, ctx_per_seq, n_seq * prompt_tokens) as s:
        base = tokenize(s, text)
        while len(base) < n_seq + prompt_tokens:
            base += base
        # Distinct prompts (each starts at its own offset of the text) so no two sequences decode alike.
        prompts = [base[i:i + prompt_tokens] for i in range(n_seq)]
        decode_tok_s(s, prompts, 4)                                             # warm-up
        yield lambda: decode_tok_s(s, prompts, tokens)


def batch1_tok_s(prompt: str, tokens: int, n_threads: int, gguf: Path | None = None) -> float:
    with batch1_peer(prompt, tokens, n_threads, gguf) as window:
        return window()


def concurrent_tok_s(text: str, n_seq: int, tokens: int, n_threads: int, gguf: Path | None = None,
                     prompt_tokens: int = PROMPT_TOKENS) -> float:
    with concurrent_peer(text, n_seq, tokens, n_threads, gguf, prompt_tokens) as window:
        return window()


def main() -> None:
    import torch
    from cpu_decode import PROMPT

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128, help="decode steps timed (per sequence)")
    ap.add_argument("--concurrent", type=int, default=32, help="sequences decoded together (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="default: torch's thread count")
    ap.add_argument("--gguf", type=Path, default=None, help="default: the default model's GGUF")
    a = ap.parse_args()
    threads = a.threads or torch.get_num_threads()
    print(f"{threads} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"llama.cpp batch 1: {batch1_tok_s(PROMPT, a.tokens, threads, a.gguf):.1f} tok/s")
    if a.concurrent:
        tok_s = concurrent_tok_s(PROMPT, a.concurrent, a.tokens, threads, a.gguf)
        print(f"llama.cpp {a.concurrent} concurrent: {tok_s:.1f} tok/s")


if __name__ == "__main__":
    main()
