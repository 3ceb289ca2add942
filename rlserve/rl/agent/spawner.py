"""The `python` tool: sandbox calls run from a helper process, so that starting their processes never
stalls the trainer.

Starting a process holds the starting process's GIL until the child has exec'd (CPython's vfork path):
~3-7 ms a sandbox call on a 2-core machine, 128-256 calls a rollout step, each one stalling the event loop
that drives the rollout and, in the asynchronous modes, the trainer's own thread. The helper (`python -m
rlserve.rl.agent.spawner SOCKET`, started once per process, light: it imports no torch) takes calls over a
Unix socket in a private directory and runs each with `sandbox.run_python`; the calling process only
writes a line and reads one back.

One connection per call: the request is a JSON line (code and limits), the answer a JSON line (output). A
caller that goes away (a cancelled call closes its connection) makes the helper cancel the call, which kills
the sandbox's process group. The helper exits when its stdin closes (the process that started it is gone),
cancelling what still runs.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import asdict

from rlserve.rl.agent.sandbox import SandboxLimits, run_python
from rlserve.rl.agent.tools import AgentTool

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0


class SandboxSpawner:
    """The helper process and its socket; `shared()` gives this process's one (started on first use)."""

    _lock = threading.Lock()
    _shared: SandboxSpawner | None = None

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rlserve-spawner-")      # mode 0700: this user's alone
        self.path = os.path.join(self.dir, "socket")
        # this process's import path, so the helper finds rlserve however this process did
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "rlserve.rl.agent.spawner", self.path], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the sandbox spawner did not start")
            time.sleep(0.01)
        atexit.register(self.close)

    @classmethod
    def shared(cls) -> SandboxSpawner:
        with cls._lock:
            if cls._shared is None or cls._shared.proc.poll() is not None:
                cls._shared = cls()
            return cls._shared

    async def run(self, code: str, limits: SandboxLimits) -> str:
        """run_python(code, limits), in the helper."""
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            writer.write(json.dumps({"code": code, "limits": asdict(limits)}).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise RuntimeError("the sandbox spawner closed the call without an answer")
            return str(json.loads(line)["output"])
        finally:
            writer.close()             # a cancelled call: the helper sees the connection close and kills it

    def close(self) -> None:
        if self.proc.poll() is None:
            with suppress(OSError):
                self.proc.stdin.close()                     # type: ignore[union-attr]
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = json.loads(await reader.readline())
        call = asyncio.ensure_future(run_python(str(request["code"]), SandboxLimits(**request["limits"])))
        gone = asyncio.ensure_future(reader.read())       # completes when the caller closes
        done, _ = await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
        if call in done:
            gone.cancel()
            writer.write(json.dumps({"output": call.result()}).encode() + b"\n")
            await writer.drain()
        else:                                             # the caller went away: stop the sandbox
            call.cancel()
            with suppress(asyncio.CancelledError):
                await call
    except (ValueError, KeyError, TypeError, ConnectionError) as e:   # a bad request or a broken connection
        with suppress(ConnectionError):
            writer.write(json.dumps({"output": f"Error: the sandbox call failed: {e}"}).encode() + b"\n")
    finally:
        writer.close()


async def _serve(path: str) -> None:
    server = await asyncio.start_unix_server(_handle, path, backlog=4096)   # a rollout's calls arrive at once
    loop = asyncio.get_running_loop()
    parent = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(parent), sys.stdin)
    async with server:
        await parent.read()           # EOF: the process that started this one is gone or closed it
    # asyncio.run cancels the calls still running; each kills its sandbox on the way out


def python_tool(limits: SandboxLimits | None = None, spawner: bool = True) -> AgentTool:
    """The `python` tool (sandbox.run_python under `limits`). `spawner`: its processes are started by the
    helper process (this module's notes say why), not by this one."""
    limits = limits or SandboxLimits()
    use_helper = spawner

    async def python(code: str) -> str:
        nonlocal use_helper
        if use_helper:
            try:
                helper = SandboxSpawner.shared()
            except (RuntimeError, OSError) as e:
                # no helper: this tool starts its sandboxes itself from now on, rather than waiting for a
                # helper that did not start on every call
                log.warning("the sandbox spawner did not start (%s); starting sandboxes from this process", e)
                use_helper = False
            else:
                return await helper.run(code, limits)
        return await run_python(code, limits)
    return AgentTool("python", "Run Python code in a sandbox (no network, no file writes, time and memory "
                     "limits) and return what it prints; the value of a last expression is printed.",
                     {"type": "object", "properties": {"code": {"type": "string", "description": "Python code"}},
                      "required": ["code"]}, python)


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
