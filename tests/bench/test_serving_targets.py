"""`python benchmarks/serving_targets.py` end to end on CPU with a tiny model and tiny runs: both
servers start and stop, the radix-on run reuses prefixes and the radix-off run doesn't, the JSON line
holds the speed-up and the ITL figures."""
from __future__ import annotations

import json

from benchmarks.serving_targets import main

TINY = ["--model", "tiny-llama", "--max-total-tokens", "16384", "--max-model-len", "512"]


def test_serving_targets_small(tmp_path, default_model_dir):
    out = tmp_path / "targets.jsonl"
    rc = main(["--groups", "2", "--questions", "3", "--prefix-len", "200", "--question-len", "16",
               "--output-len", "6", "--itl-prompts", "6", "--itl-input-len", "40", "--itl-concurrency", "3",
               "--warmup", "1", "--log-dir", str(tmp_path), "--json-out", str(out), *TINY])
    assert rc == 0
    line = json.loads(out.read_text())
    runs = line["runs"]
    on, off = runs["shared-prefix, radix on"], runs["shared-prefix, radix off"]
    itl = runs["random, max concurrency 3"]
    assert on["completed"] == off["completed"] == 6 and itl["completed"] == 6
    assert on["cached_tokens"] >= 4 * 200 and off["cached_tokens"] == 0   # 2 groups × 2 later questions
    assert on["total_output_tokens"] == off["total_output_tokens"] == 36
    assert line["radix_speedup"] > 0 and line["itl_median_ms"] > 0
    assert (tmp_path / "server-radix-on.log").exists() and (tmp_path / "server-radix-off.log").exists()
