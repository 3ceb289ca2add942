"""The structured-output overhead benchmark: constrained runs against unconstrained twins of equal length."""
from __future__ import annotations

import re

from rlserve.bench import structured


def test_structured_bench_reports_equal_work_and_the_spread_of_pairs(default_model_dir, capsys):
    structured.main(["--batch", "2", "--max-tokens", "6", "--schema", "person", "--repeats", "2", "--rounds", "2"])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("person:"))
    m = re.search(r"2 requests x 2 rounds, (\d+) output tokens each way; unconstrained ([\d,.]+) tok/s, json_schema "
                  r"([\d,.]+) tok/s, overhead (-?[\d.]+)% \(medians of 2; single pairs (-?[\d.]+)% to "
                  r"(-?[\d.]+)%\)", line)
    assert m, line
    tokens, plain, con, over, low, high = m.groups()
    assert 0 < int(tokens) <= 2 * 2 * 6 and int(tokens) % 2 == 0     # two rounds of the same tokens
    assert float(plain.replace(",", "")) > 0 and float(con.replace(",", "")) > 0
    assert float(low) <= float(high)
