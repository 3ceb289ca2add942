"""Profiling, sweep and micro-benchmark scripts, outside the package: run each from the repository root
as `python benchmarks/<name>.py --help` (rlserve installed, e.g. `pip install -e .`)."""
