"""A sandboxed Python executor: each call runs in a fresh `python -I` process (the `python` tool,
rl/agent/spawner.py, has a helper process start them, so that starting them never stalls the trainer).

Limits, applied by the child to itself before any user code runs:
- CPU time (RLIMIT_CPU) and address space (RLIMIT_AS); files it may write are capped at 0 bytes
  (RLIMIT_FSIZE); a wall-clock timeout kills the whole process group from outside.
- No network: the socket, ssl and subprocess modules (and ctypes, multiprocessing) cannot be
  imported, and `socket` / `_socket` objects already loaded are removed.
- No filesystem writes: `open` / `io.open` / `os.open` refuse write, append and create modes, and
  the os calls that remove, rename or create files and directories are replaced with ones that raise.
- No processes or signals: `system`, `fork`, the exec and spawn families, `kill` and `killpg` raise,
  through `os` and through `posix` alike (the same functions), as do `signal.pthread_kill` and
  `pidfd_send_signal` (a tool call must never signal the trainer or a server of the same user).
- An empty environment, a fresh empty temporary directory as working directory (removed after).
- Output (stdout and stderr) is truncated.

These are Python-level guards plus rlimits, not an OS sandbox: code that reaches the C level through
a module left importable could get around the import guard. For untrusted code at scale run the
executor inside a container or a network namespace as well. A last expression's value is printed,
as in a REPL, so `1234 * 5678` answers 7006652.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from dataclasses import dataclass

from rlserve.rl.agent.tools import truncate

# Runs in the child: limits, guards, then the code read from stdin.
_BOOTSTRAP = r"""
import ast, builtins, io, os, posix, resource, signal, sys, traceback
cpu_s, mem_bytes = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))   # SIGXCPU first
resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
code = sys.stdin.read()
BLOCKED = {"socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess", "ctypes", "_ctypes",
           "multiprocessing", "_multiprocessing", "asyncio", "http", "urllib", "ftplib", "smtplib", "pty"}
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
class _Deny:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"module {name!r} is not available in the sandbox")
        return None
sys.meta_path.insert(0, _Deny())
_open = builtins.open
def _ro_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        raise PermissionError("the sandbox's filesystem is read-only")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _ro_open
_os_open = os.open
def _ro_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
        raise PermissionError("the sandbox's filesystem is read-only")
    return _os_open(path, flags, *args, **kwargs)
os.open = _ro_os_open
def _refuse(*a, **k):
    raise PermissionError("not allowed in the sandbox")
for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "mkdir", "makedirs",
             "link", "symlink", "truncate", "chmod", "chown", "system", "popen", "fork", "forkpty",
             "execv", "execve", "execl", "execle", "execlp", "execvp", "execvpe", "spawnv", "spawnve",
             "posix_spawn", "posix_spawnp", "kill", "killpg", "putenv", "chdir", "chroot"):
    for module in (os, posix):           # os's functions are posix's: `import posix` reaches them too
        if hasattr(module, name):
            setattr(module, name, _refuse)
for name in ("pthread_kill", "pidfd_send_signal"):
    if hasattr(signal, name):
        setattr(signal, name, _refuse)
tree = ast.parse(code, "<tool>", "exec")
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
env = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(tree, "<tool>", "exec"), env)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<tool>", "eval"), env)
        if value is not None:
            print(repr(value))
except BaseException as e:       # the user's frames only, not the bootstrap's
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<tool>"]
    sys.stdout.flush()
    print("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
          + "".join(traceback.format_exception_only(type(e), e)), end="", file=sys.stderr)
    sys.exit(1)
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0               # wall clock, enforced from outside
    cpu_s: int = 2                       # RLIMIT_CPU
    memory_mb: int = 512                 # RLIMIT_AS
    max_output_chars: int = 2000


async def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> str:
    """Run `code`; → its stdout and stderr (truncated), or an error line on timeout or a failed exit."""
    with tempfile.TemporaryDirectory(prefix="rlserve-sandbox-") as workdir:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", _BOOTSTRAP, str(limits.cpu_s), str(limits.memory_mb << 20),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            cwd=workdir, env={}, start_new_session=True)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(code.encode()), limits.timeout_s)
        except TimeoutError:
            _kill(proc.pid)
            await proc.wait()
            return f"Error: the code ran past the {limits.timeout_s:g} s time limit"
        except asyncio.CancelledError:   # the rollout gave up on this call: leave no process behind
            _kill(proc.pid)
            await proc.wait()
            raise
    text = out.decode(errors="replace")
    if proc.returncode and proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        text += f"\nError: killed by {name}" + (" (CPU time limit)" if name == "SIGXCPU" else "")
    return truncate(text.strip(), limits.max_output_chars)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)   # its own session: the group is the child and anything it started
    except ProcessLookupError:
        pass
