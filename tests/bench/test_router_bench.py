"""`python benchmarks/router.py overhead` end to end on a CPU: the stand-in worker registers with the
router, every route and mode goes through it, and the JSON line holds both sides' percentiles."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("sglang_router")

from benchmarks.router import main  # noqa: E402


def test_router_overhead_small(tmp_path):
    out = tmp_path / "overhead.jsonl"
    rc = main(["overhead", "--step-ms", "2", "--chunks", "2", "--requests", "3", "--warmup", "1",
               "--log-dir", str(tmp_path), "--json-out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["runs"]
    assert [(r["route"], r["stream"], r["what"]) for r in rows] == [
        (route, stream, what) for route in ("/v1/completions", "/generate")
        for stream, what in ((False, "answer"), (True, "first chunk"), (True, "end"))]
    for r in rows:
        assert r["n"] == 3
        assert r["added_p50_ms"] == pytest.approx(r["router_p50_ms"] - r["direct_p50_ms"])
    first, end = rows[1], rows[2]
    assert end["direct_p50_ms"] >= first["direct_p50_ms"] and end["router_p50_ms"] >= first["router_p50_ms"]
    assert (tmp_path / "router.log").exists()
