"""Running a test file's Triton kernels on a CPU: the test launches its own file as a child process with
TRITON_INTERPRET=1 (which must be set before any kernel is defined). Imported by the test files of this
folder, which pytest and the child process both put on sys.path."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_under_triton_interpreter(script: str, *args: str) -> str:
    """Run `script` with `args` under the interpreter; assert it succeeded and return its stdout."""
    pytest.importorskip("triton")
    if sys.platform == "win32":
        pytest.skip("the interpreter run needs a POSIX child process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout
