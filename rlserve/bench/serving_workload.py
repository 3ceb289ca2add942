"""What a serving run sends, and when: random or shared-prefix token-id prompts, Poisson arrival times."""
from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    output_len: int
    group: int = -1            # shared-prefix group, -1 for random requests


def parse_len(text: str) -> tuple[int, int]:
    """'256' → (256, 256); '100:1024' → (100, 1024)."""
    lo, _, hi = text.partition(":")
    try:
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length or LO:HI range: {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text!r}")
    return bounds


def _ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(n)]


def random_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    vocab_size: int, seed: int) -> list[BenchRequest]:
    """`num` requests; each draws its input length, its ids, then its output length."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        ids = _ids(rng, rng.randint(*input_len), vocab_size)
        out.append(BenchRequest(ids, rng.randint(*output_len)))
    return out


def shared_prefix_requests(num_groups: int, questions_per_group: int, prefix_len: int, question_len: int,
                           output_len: tuple[int, int], vocab_size: int, seed: int) -> list[BenchRequest]:
    """Group by group: a random prefix, then its questions (prefix + a random suffix, then an output length)."""
    rng = random.Random(seed)
    out = []
    for g in range(num_groups):
        prefix = _ids(rng, prefix_len, vocab_size)
        for _ in range(questions_per_group):
            question = _ids(rng, question_len, vocab_size)
            out.append(BenchRequest(prefix + question, rng.randint(*output_len), g))
    return out


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send offsets (s from the start) of a Poisson process of `rate` requests/s; all 0 for inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
