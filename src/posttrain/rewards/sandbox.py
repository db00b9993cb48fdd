"""Run model-written Python in a resource-limited subprocess, for rewards that execute code.

A policy under RL writes programs; a reward that runs them must survive the ones that loop forever, eat all
memory, fill the disk or flood stdout. :func:`run_python` runs a source string with:

- a fresh interpreter in isolated mode (``python -I``: no ``PYTHON*`` variables, no user site-packages, the
  script's directory is not trusted on ``sys.path``), in a new empty temporary directory that is the working
  directory and ``HOME``, and is deleted afterwards;
- an environment stripped to ``PATH``, ``LANG`` and ``PYTHONHASHSEED`` (no proxies, tokens or API keys);
- ``setrlimit`` limits: address space (``memory_mb``), CPU seconds (``timeout + 1``), file size (16 MiB),
  open files (64) and no core dumps. ``RLIMIT_NPROC`` is left alone: it counts every process of the user, so a
  low value would break the trainer's own workers, not just the child's;
- its own session (process group) and a wall-clock ``timeout`` after which the whole group is killed, so a
  ``sleep`` or a blocked ``input()`` cannot outlive it either, and the group is killed after a normal exit too,
  so no forked child stays behind;
- stdout and stderr written to files (a flood cannot exhaust the trainer's memory; the file-size limit
  stops it) and read back truncated to 64 KiB each.

What it does NOT protect against: this is a resource-limited subprocess, not a security boundary. There is no
network namespace (the code can open sockets), no seccomp filter (every system call is allowed), no
filesystem isolation (it can read whatever the user can, and write outside its directory), and a child that
calls ``setsid`` escapes the group kill. That is enough for a policy's honest mistakes; code from a hostile
party needs a container or VM (gVisor, firejail, nsjail, a throwaway VM).

The limits are set by a small launcher that execs the real interpreter, rather than in ``preexec_fn``: the
trainer has threads (tokenizers, data loaders, the judge's pool), and Python documents ``preexec_fn`` as unsafe
with threads (the forked child may deadlock before ``exec``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept (each)
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # bytes any single file written by the child may reach
OPEN_FILES_LIMIT = 64

# Runs as `python -I -c _LAUNCHER <memory bytes> <cpu seconds> <fsize bytes> <nofile> main.py`: sets the
# limits (soft == hard, so the child cannot raise them again) and replaces itself with the real interpreter.
_LAUNCHER = """
import os, resource, sys
memory, cpu, fsize, nofile = map(int, sys.argv[1:5])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
os.execv(sys.executable, [sys.executable, "-I", sys.argv[5]])
"""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # negative: killed by that signal (-9 after a timeout, -24 SIGXCPU at the CPU limit)
    stdout: str
    stderr: str
    timed_out: bool  # the wall-clock timeout expired and the process group was killed


def _read_capped(path: Path) -> str:
    size = path.stat().st_size
    with path.open("rb") as f:
        text = f.read(OUTPUT_LIMIT).decode("utf-8", errors="replace")
    if size > OUTPUT_LIMIT:
        text += f"\n[... {size - OUTPUT_LIMIT} more bytes truncated]"
    return text


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def run_python(source: str, timeout: float, memory_mb: int) -> SandboxResult:
    """Run ``source`` as a Python script under the limits above; never raises for anything the code does."""
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"run_python: timeout ({timeout}) and memory_mb ({memory_mb}) must be positive")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory(prefix="posttrain-sandbox-") as tmp:
        # The code runs in work/; its captured output lives beside it, out of its directory listing.
        work, stdout_path, stderr_path = Path(tmp) / "work", Path(tmp) / "stdout", Path(tmp) / "stderr"
        work.mkdir()
        (work / "main.py").write_text(source, encoding="utf-8")
        env["HOME"] = env["TMPDIR"] = str(work)
        limits = [memory_mb * 1024 * 1024, int(timeout) + 1, FILE_SIZE_LIMIT, OPEN_FILES_LIMIT]
        command = [sys.executable, "-I", "-c", _LAUNCHER, *map(str, limits), "main.py"]
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # on timeout, and any child left running after a normal exit
            proc.wait()
        return SandboxResult(proc.returncode, _read_capped(stdout_path), _read_capped(stderr_path), timed_out)
