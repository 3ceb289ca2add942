"""Child processes the router launcher owns: each in its own process group (a server's engine core
process goes with it), its output in a log file, stopped with SIGTERM and then SIGKILL to the group."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

GROUP_GRACE_S = 10.0
POLL_S = 0.3


class ManagedProcess:
    """One command, started by start() (again after it exits: a restart keeps the log, appending)."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(self.env or {})}
        with open(self.log_path, "a" if self.starts else "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.starts += 1
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def terminate(self) -> None:
        """SIGTERM to the leader only: it drains and then stops its own children."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the leader alone (a crash, as a test makes one): its group's other members remain
        for wait() to clean up."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()

    def kill_group(self) -> None:
        """After the leader died: SIGKILL what is left of its group (an orphaned engine process)."""
        if self.proc is not None and not self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._group_gone(GROUP_GRACE_S)

    def wait(self, timeout: float) -> None:
        """Until the leader exits (SIGKILL to the group past `timeout`) and its group is empty."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if not self._group_gone(GROUP_GRACE_S if self.proc.poll() is not None else 0.0):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._group_gone(GROUP_GRACE_S)

    def stop(self, timeout: float) -> None:
        self.terminate()
        self.wait(timeout)

    def _group_gone(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            self.proc.poll()          # reaps the leader
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:   # the group id was reused by someone else's process
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def wait_http_ok(proc: ManagedProcess, url: str, timeout: float, headers: Mapping[str, str] | None = None) -> None:
    """Poll GET `url` until it answers 200; RuntimeError (with the log's tail) when the process exits or
    `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.returncode()}:\n{proc.tail()}")
        try:
            if httpx.get(url, timeout=5, headers=dict(headers or {})).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"{proc.name} was not ready within {timeout:.0f} s:\n{proc.tail()}")
