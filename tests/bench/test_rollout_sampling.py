"""The rollout-sampling benchmark times seeded and unseeded sides of the same work."""
from __future__ import annotations

import re

from benchmarks import rollout_sampling


def test_rollout_sampling_bench_times_both_sides_of_equal_work(capsys):
    rollout_sampling.main(["--model", "tiny-qwen3", "--dtype", "float32", "--prompts", "2", "--n", "3",
                           "--max-tokens", "4", "--prompt-len", "5", "--prompt-vocab", "200", "--rounds", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("seeded=")]
    assert [ln.split(":")[0] for ln in lines] == ["seeded=True", "seeded=False"]
    for ln in lines:
        tokens, took, rate = re.search(r"(\d+) tokens in ([\d.]+) s = ([\d,]+) tok/s", ln).groups()
        assert int(tokens) == 2 * 3 * 4
        assert float(rate.replace(",", "")) > 0
