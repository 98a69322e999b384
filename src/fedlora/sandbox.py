"""Running generated code against its tests, never in the fedlora process: one sandboxed subprocess per program.

Each program runs in a fresh ``python -I`` (isolated: no user site, no ``PYTHON*`` variables) in its own temporary
directory (also its ``HOME`` and ``TMPDIR``, removed afterwards) and its own session and process group, with
stdin closed and a minimal environment. Before the program starts, the child limits itself through ``resource``:
address space (``memory_bytes``), CPU time, file size and no core dumps. The parent waits ``timeout`` seconds of
wall time, then kills the whole process group (children the program forked included); it always kills the group
once the program is done. A program passes when it runs to its end within the limits: the launcher prints a
marker after the program's last statement, and the run passes on exit status 0 with that marker as the last line of
its output (a program that calls ``exit(0)`` before its tests does not pass).

This contains mistakes (infinite loops, runaway memory, stray files, forks), not a determined attacker: the
program runs as the same user with network access. Run untrusted code in a container or VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 10.0
"""Seconds of wall time one program may take."""

MEMORY_BYTES = 1 << 30
"""Address-space limit of one program (1 GiB)."""

_FILE_BYTES = 1 << 24

MARKER = "fedlora-sandbox: the program ran to its end"

_LAUNCHER = """
import resource, sys
memory, cpu, files = (int(x) for x in sys.argv[2:5])
marker = sys.argv[5]
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
path = sys.argv[1]
sys.argv = [path]
source = open(path, encoding="utf-8").read()
exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path})
print("\\n" + marker, flush=True)
"""


@dataclass(frozen=True)
class Outcome:
    """How one program ended: ``passed``, and why not (``timeout``, ``exit <code>`` with the last line of its
    error output, or ``signal <n>``)."""

    passed: bool
    reason: str


def run(program: str, *, timeout: float = TIMEOUT, memory_bytes: int = MEMORY_BYTES) -> Outcome:
    """Run ``program`` (Python source) in a sandboxed subprocess; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="fedlora-sandbox-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        err, out = Path(tmp) / "stderr.txt", Path(tmp) / "stdout.txt"
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        cpu = max(1, int(timeout) + 1)
        limits = [str(memory_bytes), str(cpu), str(_FILE_BYTES)]
        argv = [sys.executable, "-I", "-c", _LAUNCHER, str(path), *limits, MARKER]
        with err.open("wb") as stderr, out.open("wb") as stdout:
            proc = subprocess.Popen(
                argv,
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return Outcome(False, "timeout")
            finally:
                _kill_group(proc)
        if code == 0:
            ended = out.read_text(errors="replace").rstrip("\n").endswith(MARKER)
            return Outcome(True, "passed") if ended else Outcome(False, "exited before its end")
        if code < 0:
            return Outcome(False, f"signal {-code}")
        lines = err.read_text(errors="replace").strip().splitlines()
        return Outcome(False, f"exit {code}" + (f": {lines[-1]}" if lines else ""))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the program's process group (its own session) and reap the program."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def passes(head: str, code: str, tests: str, **limits: float) -> bool:
    """Whether ``head + code + tests`` runs to the end (the tests' asserts hold) within the limits."""
    return run(f"{head}\n{code}\n\n{tests}", **limits).passed  # type: ignore[arg-type]
