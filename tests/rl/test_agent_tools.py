"""The sandboxed Python tool refuses file writes and network, enforces its CPU, memory and wall-clock
limits and truncates output; the lookup tool ranks a local corpus by keywords."""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from rlserve.rl.agent.lookup import Corpus, lookup_tool
from rlserve.rl.agent.sandbox import SandboxLimits, run_python
from rlserve.rl.agent.spawner import python_tool
from rlserve.rl.agent.tools import AgentTool, call_tool
from rlserve.tool_parsing import ToolCall


def _py(code: str, **limits) -> str:
    return asyncio.run(run_python(code, SandboxLimits(**limits)))


def test_computes_and_prints_the_last_expression():
    assert _py("1234 * 5678") == "7006652"
    assert _py("x = 3\nprint('x is', x)\nx * 2") == "x is 3\n6"
    assert "ZeroDivisionError" in _py("1 / 0")


def test_refuses_file_writes(tmp_path):
    target = tmp_path / "out.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')", f"open({str(target)!r}, 'a')",
                 f"import os; os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
                 "open('here.txt', 'x')", f"import os; os.mkdir({str(tmp_path / 'd')!r})",
                 f"import os; os.remove({str(tmp_path)!r})"):
        assert "PermissionError" in _py(code), code
    assert not target.exists() and not (tmp_path / "d").exists() and tmp_path.exists()
    assert _py(f"open({__file__!r}).readline()").startswith("'")      # reading is allowed


def test_refuses_network_and_processes():
    for code in ("import socket", "import _socket", "import urllib.request", "import subprocess",
                 "import ctypes", "import asyncio"):
        assert "ImportError" in _py(code), code
    for code in ("import os; os.system('true')", "import posix; posix.system('true')",
                 "import posix; posix.kill(posix.getppid(), 0)", "import os; os.fork()",
                 "import signal; signal.pthread_kill(0, 0)"):
        assert "PermissionError" in _py(code), code
    assert _py("import os; sorted(os.environ)") in ("[]", "['LC_CTYPE']")   # an empty environment


def test_enforces_cpu_wall_clock_and_memory_limits():
    assert "SIGXCPU" in _py("while True: pass", cpu_s=1, timeout_s=30)
    assert "time limit" in _py("import time; time.sleep(60)", timeout_s=0.5)
    assert "MemoryError" in _py("x = bytearray(1 << 31)", memory_mb=256)
    out = _py("print('a' * 10000)", max_output_chars=100)
    assert out.startswith("a" * 100) and "truncated" in out and len(out) < 200


def test_a_cancelled_call_leaves_no_process():
    async def main() -> None:
        task = asyncio.create_task(run_python("import os, time; print(os.getpid(), flush=True); time.sleep(60)"))
        await asyncio.sleep(0.5)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    before = set(os.listdir("/proc"))
    asyncio.run(main())
    # a python child with our bootstrap still alive would show up in /proc with "rlserve-sandbox" cwd
    leftovers = [p for p in set(os.listdir("/proc")) - before if p.isdigit()
                 and "rlserve-sandbox" in _cwd(p)]
    assert not leftovers


def _cwd(pid: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def test_lookup_ranks_by_keywords():
    corpus = Corpus([{"title": "Paris", "text": "Paris is the capital of France."},
                     {"title": "Lima", "text": "Lima is the capital of Peru."},
                     {"title": "Rivers", "text": "The Amazon flows through Peru and Brazil."}])
    assert [p["title"] for p in corpus.search("capital of Peru", k=1)] == ["Lima"]   # both words beat one
    assert sorted(p["title"] for p in corpus.search("Peru", k=3)) == ["Lima", "Rivers"]
    assert corpus.search("zebra") == []
    tool = lookup_tool(corpus, k=1)
    assert asyncio.run(tool.fn(query="France capital")) == "[1] Paris: Paris is the capital of France."


def test_sync_tools_and_exceptions_become_messages():
    def add(a: int, b: int) -> int:
        return a + b

    def broken() -> str:
        raise KeyError("missing")
    tools = {"add": AgentTool("add", "", {}, add), "broken": AgentTool("broken", "", {}, broken)}
    run = lambda call: asyncio.run(call_tool(tools, call, 1.0, 100))  # noqa: E731
    assert run(ToolCall("add", {"a": 2, "b": 3})) == "5"
    assert run(ToolCall("broken", {})) == "Error: KeyError: 'missing'"
    assert run(ToolCall("nope", {})).startswith("Error: unknown tool 'nope'")


def test_the_spawner_runs_calls_as_the_sandbox_does_and_cancels_them():
    """The python tool's calls go through the helper process (agent/spawner.py): the same answers, limits
    and errors as run_python; a cancelled call's sandbox is killed; closing the spawner ends the helper."""
    from rlserve.rl.agent.spawner import SandboxSpawner

    spawner = SandboxSpawner()
    limits = SandboxLimits(timeout_s=1.0)

    async def main() -> list[str]:
        answers = await asyncio.gather(*(spawner.run(f"{k} * 5678", limits) for k in (1234, 2, 3)),
                                       spawner.run("import time; time.sleep(30)", limits),
                                       spawner.run("open('x', 'w')", limits))
        task = asyncio.create_task(spawner.run("import os, time; print(os.getpid(), flush=True); time.sleep(60)",
                                               SandboxLimits(timeout_s=120)))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return answers
    try:
        before = set(os.listdir("/proc"))
        answers = asyncio.run(main())
        assert answers[:3] == ["7006652", "11356", "17034"]
        assert "time limit" in answers[3] and "PermissionError" in answers[4]
        # the helper kills the cancelled call's sandbox once it sees the connection close
        deadline = time.monotonic() + 30
        while [p for p in set(os.listdir("/proc")) - before if p.isdigit() and "rlserve-sandbox" in _cwd(p)]:
            assert time.monotonic() < deadline, "a cancelled call's sandbox is still running"
            time.sleep(0.05)
        assert asyncio.run(python_tool().fn(code="6 * 7")) == "42"        # the tool goes through a helper too
    finally:
        spawner.close()
    assert spawner.proc.returncode is not None and not os.path.exists(spawner.dir)


def test_a_spawner_that_does_not_start_is_tried_once_and_the_tool_still_answers(monkeypatch):
    from rlserve.rl.agent.spawner import SandboxSpawner

    tries = []

    def fail() -> SandboxSpawner:
        tries.append(1)
        raise RuntimeError("the sandbox spawner did not start")
    monkeypatch.setattr(SandboxSpawner, "shared", staticmethod(fail))
    tool = python_tool()
    answers = [asyncio.run(tool.fn(code="print(6 * 7)")) for _ in range(2)]
    assert [a.strip() for a in answers] == ["42", "42"] and len(tries) == 1
