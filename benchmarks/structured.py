"""Structured-output overhead: a batch under a JSON-schema constraint vs the same batch unconstrained,
forced to the same output lengths (each unconstrained request decodes exactly as many tokens as its
constrained twin produced, ignoring EOS). `python benchmarks/structured.py [--model M]`."""
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


def overhead(llm: LLM, schema: dict, batch: int, max_tokens: int, rounds: int = 1,
             control: bool = False) -> tuple[int, float, float]:
    """(output tokens, unconstrained s, constrained s) for `rounds` runs of one batch of `batch` requests
    on each side, the sides alternating run by run so that slow drifts of the host hit both (seeded:
    every round decodes the same tokens). control=True runs the unconstrained twins on both sides: the
    same measurement with no difference to find, i.e. its noise."""
    prompt = llm.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    prompts = [prompt] * batch
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, json_schema=schema)
                   for i in range(batch)]
    llm.generate(prompts[:2], constrained[:2], use_tqdm=False)         # warm up (and compile the grammar)
    _wait_for_mask_helper(llm)
    lengths: list[int] = []
    if control:     # the constrained run only sets the twins' lengths
        lengths = [len(o.outputs[0].token_ids) for o in _timed(llm, prompts, constrained)[1]]
    t_plain = t_con = 0.0
    for _ in range(rounds):
        if control:
            dt = _timed(llm, prompts, _twins(lengths))[0]
        else:
            dt, outs = _timed(llm, prompts, constrained)
            lengths = lengths or [len(o.outputs[0].token_ids) for o in outs]
        t_con += dt
        t_plain += _timed(llm, prompts, _twins(lengths))[0]
    return rounds * sum(lengths), t_plain, t_con


def _twins(lengths: list[int]) -> list[SamplingParams]:
    """Unconstrained requests that decode exactly the given numbers of tokens."""
    return [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]


def _wait_for_mask_helper(llm: LLM, timeout_s: float = 120.0) -> None:
    """Time the steady state: the mask helper processes (on CUDA) have started."""
    grammar = llm.engine.grammar
    deadline = time.monotonic() + timeout_s
    # Asking drops helpers that failed to start (status().helpers is then 0: the engine fills every mask).
    while not grammar.helpers_ready() and grammar.status().helpers:
        if time.monotonic() > deadline:
            raise RuntimeError("the grammar mask helpers did not start")
        time.sleep(0.05)


def _timed(llm: LLM, prompts: list, params: list[SamplingParams]) -> tuple[float, list]:
    llm.engine.flush_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t, outs


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
    ap.add_argument("--control", action="store_true",
                    help="also time unconstrained against unconstrained the same way: the noise floor")
    a = ap.parse_args(argv)
    llm = LLM(a.model, load_format=a.load_format)
    for name in SCHEMAS if a.schema == "all" else [a.schema]:
        # One untimed pair at full size first: the first run of a batch shape pays one-time costs (kernel
        # specializations, CUDA graphs of that size, the mask helpers' first fills) that are not overhead.
        overhead(llm, SCHEMAS[name], a.batch, a.max_tokens, 1)
        for control in (False, True) if a.control else (False,):
            # Each run is short, so a few ms of host jitter move it: repeat, report medians, and show how
            # far the overhead of single pairs (the sides' runs alternating) spreads.
            runs = [overhead(llm, SCHEMAS[name], a.batch, a.max_tokens, a.rounds, control)
                    for _ in range(a.repeats)]
            _report(f"{name} (control: unconstrained both ways)" if control else name, a, runs)


def _report(label: str, a: argparse.Namespace, runs: list[tuple[int, float, float]]) -> None:
    plain = statistics.median(n / t for n, t, _ in runs)
    con = statistics.median(n / t for n, _, t in runs)
    pairs = sorted(100 * (t_con / t_plain - 1) for _, t_plain, t_con in runs)
    rounds = f" x {a.rounds} rounds" if a.rounds > 1 else ""
    print(f"{label}: {a.batch} requests{rounds}, {runs[0][0]} output tokens each way; unconstrained {plain:,.1f} "
          f"tok/s, json_schema {con:,.1f} tok/s, overhead {100 * (plain / con - 1):.1f}% (medians of "
          f"{a.repeats}; single pairs {pairs[0]:.1f}% to {pairs[-1]:.1f}%, median pair "
          f"{statistics.median(pairs):.1f}%)")

if __name__ == "__main__":
    main()
