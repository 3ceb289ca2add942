"""Structured-output overhead: a batch under a JSON-schema constraint vs the same batch unconstrained,
forced to the same output lengths (each unconstrained request decodes exactly as many tokens as its
constrained twin produced, ignoring EOS). `python -m rlserve.bench.structured [--model M]`."""
from __future__ import annotations

import argparse
import time

from rlserve import LLM, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--load-format", default="auto", help="dummy: random weights at the model's architecture")
    a = ap.parse_args()
    llm = LLM(a.model, load_format=a.load_format)
    prompt = llm.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    prompts = [prompt] * a.batch
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=a.max_tokens, json_schema=SCHEMA)
                   for i in range(a.batch)]
    llm.generate(prompts[:2], constrained[:2], use_tqdm=False)         # warm up (and compile the grammar)
    llm.engine.flush_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, constrained, use_tqdm=False)
    t_con = time.perf_counter() - t
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    plain = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]
    llm.engine.flush_cache()
    t = time.perf_counter()
    llm.generate(prompts, plain, use_tqdm=False)
    t_plain = time.perf_counter() - t
    n = sum(lengths)
    print(f"{a.batch} requests, {n} output tokens each way")
    print(f"unconstrained: {n / t_plain:,.1f} tok/s   json_schema: {n / t_con:,.1f} tok/s   "
          f"overhead: {100 * (t_con / t_plain - 1):.1f}%")


if __name__ == "__main__":
    main()
