"""Structured-output overhead: a batch under a JSON-schema constraint vs the same batch unconstrained,
forced to the same output lengths (each unconstrained request decodes exactly as many tokens as its
constrained twin produced, ignoring EOS). `python -m rlserve.bench.structured [--model M]`."""
from __future__ import annotations

import argparse
import statistics
import time

from rlserve import LLM, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
# The same object with bounded string lengths. xgrammar unrolls maxLength into counted repetitions, and
# every string token then depends on how many characters are left: masks cost ~15× more to fill.
BOUNDED_SCHEMA = {**SCHEMA, "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": SCHEMA["properties"]["age"],
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}}}
SCHEMAS = {"person": SCHEMA, "person-bounded": BOUNDED_SCHEMA}


def overhead(llm: LLM, schema: dict, batch: int, max_tokens: int, rounds: int = 1) -> tuple[int, float, float]:
    """(output tokens, unconstrained s, constrained s) for `rounds` runs of one batch of `batch` requests
    (seeded, so every round decodes the same tokens)."""
    prompt = llm.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    prompts = [prompt] * batch
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, json_schema=schema)
                   for i in range(batch)]
    llm.generate(prompts[:2], constrained[:2], use_tqdm=False)         # warm up (and compile the grammar)
    _wait_for_mask_helper(llm)
    t_con, outs = _timed(llm, prompts, constrained, rounds)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    plain = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]
    t_plain, _ = _timed(llm, prompts, plain, rounds)
    return rounds * sum(lengths), t_plain, t_con


def _wait_for_mask_helper(llm: LLM, timeout_s: float = 120.0) -> None:
    """Time the steady state: the grammar backend's mask helper process (on CUDA) has started."""
    backend = llm.engine._grammar
    deadline = time.monotonic() + timeout_s
    # helper_ready() drops a helper that failed to start (the engine then fills every mask itself).
    while backend is not None and backend.helpers is not None and not backend.helper_ready():
        if time.monotonic() > deadline:
            raise RuntimeError("the grammar mask helper did not start")
        time.sleep(0.05)


def _timed(llm: LLM, prompts: list, params: list[SamplingParams], rounds: int) -> tuple[float, list]:
    total, outs = 0.0, []
    for _ in range(rounds):
        llm.engine.flush_cache()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        total += time.perf_counter() - t
    return total, outs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--load-format", default="auto", help="dummy: random weights at the model's architecture")
    ap.add_argument("--schema", choices=[*SCHEMAS, "all"], default="all")
    ap.add_argument("--repeats", type=int, default=3, help="timed pairs of runs (medians are reported)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of the batch timed together on each side of a pair (longer pairs)")
    a = ap.parse_args(argv)
    llm = LLM(a.model, load_format=a.load_format)
    for name in SCHEMAS if a.schema == "all" else [a.schema]:
        # One untimed pair at full size first: the first run of a batch shape pays one-time costs (kernel
        # specializations, CUDA graphs of that size, the mask helpers' first fills) that are not overhead.
        overhead(llm, SCHEMAS[name], a.batch, a.max_tokens, 1)
        # Each side is a short run, so a few ms of host jitter move it: repeat, report medians, and show
        # how far the overhead of single pairs (constrained run, then its unconstrained twin) spreads.
        runs = [overhead(llm, SCHEMAS[name], a.batch, a.max_tokens, a.rounds) for _ in range(a.repeats)]
        plain = statistics.median(n / t for n, t, _ in runs)
        con = statistics.median(n / t for n, _, t in runs)
        pairs = sorted(100 * (t_con / t_plain - 1) for _, t_plain, t_con in runs)
        rounds = f" x {a.rounds} rounds" if a.rounds > 1 else ""
        print(f"{name}: {a.batch} requests{rounds}, {runs[0][0]} output tokens each way; unconstrained {plain:,.1f} "
              f"tok/s, json_schema {con:,.1f} tok/s, overhead {100 * (plain / con - 1):.1f}% (medians of "
              f"{a.repeats}; single pairs {pairs[0]:.1f}% to {pairs[-1]:.1f}%)")


if __name__ == "__main__":
    main()
