"""The structured-output overhead benchmark: constrained runs against unconstrained twins of equal length."""
from __future__ import annotations

import re

from benchmarks import structured


def test_structured_bench_reports_equal_work_and_the_spread_of_pairs(default_model_dir, capsys):
    structured.main(["--batch", "2", "--max-tokens", "6", "--schema", "person", "--repeats", "2", "--rounds", "2",
                     "--control"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("person")]
    assert [ln.split(" requests")[0] for ln in lines] == ["person: 2", "person (control: unconstrained both ways): 2"]
    tokens = set()
    for line in lines:
        m = re.search(r"2 requests x 2 rounds, (\d+) output tokens each way; unconstrained ([\d,.]+) tok/s, "
                      r"json_schema ([\d,.]+) tok/s, overhead (-?[\d.]+)% \(medians of 2; single pairs "
                      r"(-?[\d.]+)% to (-?[\d.]+)%, median pair (-?[\d.]+)%\)", line)
        assert m, line
        n, plain, con, over, low, high, mid = m.groups()
        assert 0 < int(n) <= 2 * 2 * 6 and int(n) % 2 == 0     # two rounds of the same tokens
        assert float(plain.replace(",", "")) > 0 and float(con.replace(",", "")) > 0
        assert float(low) <= float(mid) <= float(high)
        tokens.add(n)
    assert len(tokens) == 1                                     # the control decodes the same work
