"""The benchmark scripts live in benchmarks/ at the repository root, outside the package: put the root on
sys.path so that these tests import them as `benchmarks.<name>`."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
