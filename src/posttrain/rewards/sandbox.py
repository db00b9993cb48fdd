"""Run model-written Python in a resource-limited subprocess, for rewards that execute code.

Two entry points: :func:`run_python` runs a script and reports its exit; :func:`run_tests` runs a solution and
its tests and reports a pass *only when the test harness itself says the tests ran to their end* (below), which
is what ``code_tests`` rewards use.

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

**The test harness of run_tests.** A policy under RL finds shortcuts: ``sys.exit(0)``, ``os._exit(0)`` or
``raise SystemExit`` before the tests used to exit with status 0, which read as a pass. Now:

- the parent makes a fresh random token per run and hands it over a pipe on stdin; it is in no file, no
  argument and no environment variable. The harness moves that pipe to another descriptor (stdin becomes
  /dev/null) and reads the token only after the solution and then the tests have run to their end without an
  exception, in a fresh ``__main__`` namespace; it writes the token to a report file outside the work directory
  and ends the process at once (``os._exit``: no ``atexit`` hook runs after it). Any exception, ``SystemExit``
  included, an early ``os._exit``, a signal or a timeout leaves no token: a fail. The parent counts a pass only
  for exit status 0 *and* the exact token in the report;
- before the solution runs, the harness installs a PEP 578 audit hook (it cannot be removed from Python) that
  refuses: creating processes or sending signals (``os.fork``, ``os.forkpty``, ``os.posix_spawn``, ``os.spawn``,
  ``os.exec``, ``os.system``, ``subprocess.Popen``, ``os.kill``, ``os.killpg``; this is the process-count limit,
  since ``RLIMIT_NPROC`` is also set to the user's current task count + 32 but root ignores it); loading
  ``ctypes`` (``ctypes.dlopen``/``dlsym`` and importing it, since ctypes could write memory and undo the rest);
  network connections (``socket.connect``, ``bind``, ``sendto``, ``sendmsg``); writing, creating, deleting,
  renaming or changing the mode of any file outside the work directory; and reading or listing anything outside
  the work directory and the interpreter's own installation (``sys.prefix``, ``sys.base_prefix``, which hold the
  standard library and site-packages) and ``/dev/null``, ``/dev/urandom``.

What it does NOT protect against: this is a resource-limited subprocess with an in-process fence, not a security
boundary. CPython's documentation says plainly that audit hooks are not a sandbox: code set on breaking out can
(by memory corruption through a C extension, say, or by reading the harness's descriptors, which the fence does
not hide) forge a pass or reach the files the user can. There is no network namespace, no seccomp filter and no
filesystem namespace, and a child that calls ``setsid`` would escape the group kill if it could fork. That is
enough for a policy's honest mistakes and for the shortcuts it stumbles on; code from a hostile party needs a
container or VM (gVisor, firejail, nsjail, a throwaway VM).

A reward hack this does not stop, because it is in the *tests*: an object whose ``__eq__`` always returns True
makes ``assert f(x) == y`` pass. Write tests that check types too (``assert type(r) is int and r == 3``).

The limits are set by a small launcher that execs the real interpreter, rather than in ``preexec_fn``: the
trainer has threads (tokenizers, data loaders, the judge's pool), and Python documents ``preexec_fn`` as unsafe
with threads (the forked child may deadlock before ``exec``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept (each)
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # bytes any single file written by the child may reach
OPEN_FILES_LIMIT = 64

NPROC_HEADROOM = 32  # processes/threads the child may add to the user's current count (not for root)

# Runs as `python -I -c _LAUNCHER <memory bytes> <cpu seconds> <fsize bytes> <nofile> SCRIPT [ARGS]`: sets the
# limits (soft == hard, so the child cannot raise them again) and replaces itself with the real interpreter.
_LAUNCHER = """
import os, resource, sys
memory, cpu, fsize, nofile = map(int, sys.argv[1:5])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
if os.geteuid() != 0:  # RLIMIT_NPROC counts every task of the user; root is exempt from it
    try:
        uid, tasks = os.getuid(), 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    tasks += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
        resource.setrlimit(resource.RLIMIT_NPROC, (tasks + %d, tasks + %d))
    except (OSError, ValueError):
        pass
os.execv(sys.executable, [sys.executable, "-I", *sys.argv[5:]])
""" % (NPROC_HEADROOM, NPROC_HEADROOM)

# The harness of run_tests (module docstring), run as `python -I harness.py REPORT_PATH` in the work directory,
# which holds solution.py and tests.py. It holds no secret: the token waits unread in the stdin pipe.
_HARNESS = r"""
import os, sys

def _harness():
    read, write, exit_now = os.read, os.write, os._exit
    token_fd = os.dup(0)  # the pipe the parent wrote the token into; stdin becomes /dev/null
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    report_fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
    work = os.path.realpath(os.getcwd())
    with open("solution.py", encoding="utf-8") as f:
        solution = compile(f.read(), "solution.py", "exec")
    with open("tests.py", encoding="utf-8") as f:
        tests = compile(f.read(), "tests.py", "exec")
    readable = [work] + sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    devices = {"/dev/null", "/dev/urandom"}
    refused = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
               "os.kill", "os.killpg", "os.startfile", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
               "ctypes.cdata", "ctypes.call_function", "socket.connect", "socket.bind", "socket.sendto",
               "socket.sendmsg"}
    changes = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.lchmod", "os.chown", "os.lchown",
               "os.symlink", "os.link", "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.setxattr",
               "os.removexattr", "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
               "shutil.move", "shutil.chown", "os.mkfifo", "os.mknod"}
    lists = {"os.listdir", "os.scandir", "os.chdir", "glob.glob", "os.walk"}
    realpath, join, fsdecode = os.path.realpath, os.path.join, os.fsdecode
    busy = []

    def inside(path, roots):
        if path is None or isinstance(path, int):
            return True  # a descriptor already opened, or the current directory
        full = realpath(join(work, fsdecode(path)))
        return full in devices or any(full == r or full.startswith(r + os.sep) for r in roots)

    def hook(event, args):
        if busy:  # the hook's own path checks
            return
        busy.append(1)
        try:
            if event in refused:
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "import" and args[0] in ("ctypes", "_ctypes"):
                # ImportError, so libraries that use ctypes only when it is there (numpy) still import
                raise ImportError("sandbox: ctypes is not allowed")
            if event == "open":
                path, mode, flags = (list(args) + [None, None])[:3]
                writes = (any(c in (mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR |
                          os.O_CREAT | os.O_TRUNC | os.O_APPEND))
                if not inside(path, [work] if writes else readable):
                    raise PermissionError(f"sandbox: {'writing' if writes else 'reading'} {path!r} is not allowed")
            elif event in changes:
                for path in args[:2] if event in ("os.rename", "os.symlink", "os.link", "shutil.copyfile",
                                                  "shutil.move") else args[:1]:
                    if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, [work]):
                        raise PermissionError(f"sandbox: {event} on {path!r} is not allowed")
            elif event in lists and args and isinstance(args[0], (str, bytes, os.PathLike)):
                if not inside(args[0], readable):
                    raise PermissionError(f"sandbox: {event} on {args[0]!r} is not allowed")
        finally:
            busy.pop()

    sys.addaudithook(hook)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(solution, namespace)
        exec(tests, namespace)
    except BaseException as e:  # SystemExit included: the tests did not run to their end
        write(2, f"sandbox harness: {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        exit_now(1)
    token = read(token_fd, 256)
    write(report_fd, token)
    exit_now(0)

_harness()
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


@dataclass(frozen=True)
class TestsResult:
    passed: bool  # the harness reported that the solution and the tests ran to their end (module docstring)
    reason: str  # why not, for logs: "timed out", "exit status 1: AssertionError: ...", "no harness report"
    run: SandboxResult


def _spawn(tmp: Path, script: str, args: list[str], stdin: bytes | None, timeout: float,
           memory_mb: int) -> SandboxResult:
    """Run ``python -I script args`` in ``tmp/work`` under the limits; its output goes to files in ``tmp``."""
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"sandbox: timeout ({timeout}) and memory_mb ({memory_mb}) must be positive")
    work, stdout_path, stderr_path = tmp / "work", tmp / "stdout", tmp / "stderr"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "HOME": str(work), "TMPDIR": str(work)}
    limits = [memory_mb * 1024 * 1024, int(timeout) + 1, FILE_SIZE_LIMIT, OPEN_FILES_LIMIT]
    command = [sys.executable, "-I", "-c", _LAUNCHER, *map(str, limits), script, *args]
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=err, start_new_session=True,
                                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE)
        if stdin is not None:
            try:
                proc.stdin.write(stdin)  # a few bytes: the pipe buffer takes them without the child reading
                proc.stdin.close()
            except BrokenPipeError:
                pass
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # on timeout, and any child left running after a normal exit
        proc.wait()
    return SandboxResult(proc.returncode, _read_capped(stdout_path), _read_capped(stderr_path), timed_out)


def run_python(source: str, timeout: float, memory_mb: int) -> SandboxResult:
    """Run ``source`` as a Python script under the limits above; never raises for anything the code does."""
    with tempfile.TemporaryDirectory(prefix="posttrain-sandbox-") as tmp:
        # The code runs in work/; its captured output lives beside it, out of its directory listing.
        (Path(tmp) / "work").mkdir()
        (Path(tmp) / "work" / "main.py").write_text(source, encoding="utf-8")
        return _spawn(Path(tmp), "main.py", [], None, timeout, memory_mb)


def run_tests(solution: str, tests: str, timeout: float, memory_mb: int) -> TestsResult:
    """Run ``solution`` and then ``tests`` in the harness (module docstring); never raises for what the code does."""
    token = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="posttrain-sandbox-") as tmp:
        root = Path(tmp)
        work = root / "work"
        work.mkdir()
        (work / "solution.py").write_text(solution, encoding="utf-8", errors="surrogatepass")
        (work / "tests.py").write_text(tests, encoding="utf-8", errors="surrogatepass")
        (root / "harness.py").write_text(_HARNESS, encoding="utf-8")
        report = root / "report"
        report.write_bytes(b"")
        run = _spawn(root, str(root / "harness.py"), [str(report)], token.encode() + b"\n", timeout, memory_mb)
        reported = report.read_bytes().strip()
    if run.timed_out:
        return TestsResult(False, f"timed out after {timeout:g} s", run)
    if run.returncode != 0:
        last = run.stderr.strip().splitlines()[-1:] or [""]
        return TestsResult(False, f"exit status {run.returncode}: {last[0][:200]}", run)
    if reported != token.encode():
        return TestsResult(False, "exit status 0 but no harness report: the code ended the process early", run)
    return TestsResult(True, "", run)
