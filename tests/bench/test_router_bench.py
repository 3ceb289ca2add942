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


def test_policies_pass_the_balance_thresholds_to_the_router():
    """`router.py policies --balance-abs-threshold/--balance-rel-threshold` reach sglang-router's flags;
    left out, the router keeps its own defaults."""
    import argparse

    from benchmarks import router
    from rlserve.router.config import router_flags

    parser = argparse.ArgumentParser()
    router.add_policies_args(parser)
    flags = router_flags(router.policy_config("cache_aware", parser.parse_args(
        ["--balance-abs-threshold", "256", "--balance-rel-threshold", "3"])))
    assert flags[flags.index("--balance-abs-threshold") + 1] == "256"
    assert flags[flags.index("--balance-rel-threshold") + 1] == "3.0"
    assert "--balance-abs-threshold" not in router_flags(router.policy_config("cache_aware", parser.parse_args([])))


def test_policy_entries_carry_their_own_threshold_and_bad_ones_are_refused():
    import argparse

    from benchmarks import router
    from rlserve.router.config import router_flags

    parser = argparse.ArgumentParser()
    router.add_policies_args(parser)
    args = parser.parse_args(["--balance-abs-threshold", "128"])
    flags = router_flags(router.policy_config("cache_aware:512", args))
    assert flags[flags.index("--balance-abs-threshold") + 1] == "512"
    flags = router_flags(router.policy_config("cache_aware", args))
    assert flags[flags.index("--balance-abs-threshold") + 1] == "128"
    for bad in ("round_robin:512", "cache_aware:x", "fastest"):
        with pytest.raises(ValueError, match="unknown policy"):
            router.policy_config(bad, args)
