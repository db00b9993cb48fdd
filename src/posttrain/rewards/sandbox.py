"""Run model-written Python in a resource-limited subprocess, for rewards that execute code.

A policy under RL writes programs; a reward that runs them must survive the ones that loop forever, eat all
memory, fill the disk or flood stdout, and must not be fooled by the ones that fake a pass. Two entry points:

- :func:`run_python` runs a source string as a script and reports how it exited;
- :func:`run_tests` runs a solution and then its tests under a harness, and reports a pass only when the
  harness itself says that both ran to their end. ``code_tests`` rewards use this one.

Both run the code with:

- a fresh interpreter in isolated mode (``python -I``: no ``PYTHON*`` variables, no user site-packages, the
  script's directory is not trusted on ``sys.path``), in a new empty temporary directory that is the working
  directory and ``HOME``, and is deleted afterwards;
- an environment stripped to ``PATH``, ``LANG`` and ``PYTHONHASHSEED`` (no proxies, tokens or API keys);
- ``setrlimit`` limits: address space (``memory_mb``), CPU seconds (``timeout + 1``), file size (16 MiB), open
  files (64), no core dumps, and, when not running as root, processes: ``RLIMIT_NPROC`` is set to the number
  of tasks (threads) the user already has + 32. The limit counts every task of the user, which is why it is
  relative; root ignores it, so as root (how the test suite runs here) the audit hook below is the only
  process-count guard, and only :func:`run_tests` has that hook;
- its own session (process group) and a wall-clock ``timeout`` after which the whole group is killed, so a
  ``sleep`` or a blocked ``input()`` cannot outlive it either, and the group is killed after a normal exit
  too, so no forked child stays behind;
- stdout and stderr written to files (a flood cannot exhaust the trainer's memory; the file-size limit stops
  it) and read back truncated to 64 KiB each.

**The harness of run_tests.** A pass used to be "exit status 0", and ``sys.exit(0)``, ``os._exit(0)`` or
``raise SystemExit`` before the tests scored 1.0; a policy finds that. Now:

- the parent draws a fresh random token per run (``secrets.token_hex``) and writes it into the child's stdin
  pipe. It is in no file, argument or environment variable. The harness reads it before any user code runs,
  points fd 0 at ``/dev/null``, and keeps the token inside a generator frame that is released only when the
  harness's own frame asks, after ``exec`` of the solution and then of the tests (each compiled up front, run
  in a fresh ``__main__`` namespace) returned normally. It then writes the token to a report file it opened
  beforehand, outside the work directory, and ends the process at once with ``os._exit(0)`` (no ``atexit``
  hook runs). Any ``BaseException``, ``SystemExit`` included, is a fail whose type is in ``reason``;
- the parent counts a pass only for exit status 0, no timeout *and* a report holding exactly the token;
- before user code runs the harness installs a PEP 578 audit hook (``sys.addaudithook``; Python code cannot
  remove one). It refuses, with ``PermissionError`` inside the child: creating processes and sending signals
  (the events ``os.fork``, ``os.forkpty``, ``os.posix_spawn``, ``os.spawn``, ``os.exec``, ``os.system``,
  ``subprocess.Popen``, ``pty.spawn``, ``os.kill``, ``os.killpg``, ``signal.pthread_kill``, ``os.startfile``;
  ``_posixsubprocess.fork_exec`` and ``signal.pidfd_send_signal``, which raise no event, are replaced);
  ``ctypes`` (``ctypes.dlopen``, ``ctypes.dlsym``, ``ctypes.dlsym/handle``, and importing ``ctypes``,
  ``_ctypes``, the ``_test*`` C modules or subinterpreters, which raise ``ImportError`` so that libraries with
  a fallback, such as numpy, still import); raising limits (``resource.setrlimit``, ``resource.prlimit``: root
  could raise its hard limits); network connections (``socket.connect``, ``socket.bind``, ``socket.sendto``,
  ``socket.sendmsg``: no fetching answers, no local services such as a Docker socket; name lookups and
  ``socketpair``, which asyncio uses, still work); the introspection that would reach the token or skip an
  ``assert`` (``sys.settrace``, ``sys.setprofile``, ``sys._current_frames``, ``gc.get_objects``,
  ``gc.get_referrers``, ``gc.get_referents``, ``sys.addaudithook``, ``cpython.PyInterpreterState_New``, the
  harness's generators' ``gi_frame``); and files outside the fence. Writing, creating, deleting, renaming,
  linking or changing the metadata of a file (``open`` for writing, ``os.remove``, ``os.rmdir``, ``os.mkdir``,
  ``os.rename``, ``os.link``, ``os.truncate``, ``os.chmod``, ``os.chown``, ``os.utime``, ``os.setxattr``,
  ``os.removexattr``, ``shutil.rmtree``, ``sqlite3.connect``) is allowed only inside the work directory,
  ``os.chdir`` likewise, and ``os.symlink`` is refused (a link would let a path checked inside the directory
  resolve outside it a moment later). Reading and listing (``open``, ``os.listdir``, ``os.scandir``,
  ``os.getxattr``, ``os.listxattr``) is allowed inside the work directory and the interpreter's installation
  (``sys.prefix``, ``sys.base_prefix``, ``sys.exec_prefix``: the standard library and site-packages, which
  imports need), plus ``/dev/null``, ``/dev/zero``, ``/dev/random`` and ``/dev/urandom``. Paths are resolved
  (relative to the working directory or the ``dir_fd``, symlinks followed) before the check; device nodes and
  directories outside the work directory cannot be opened. The hook, the harness's ``exec`` and its report
  path use no global or builtin name, so code that rewrites the harness's globals or ``builtins`` cannot
  change them, and the tests run with a copy of the builtins taken before the solution ran.

What it does NOT protect against: this is a resource-limited subprocess with an in-process fence, not a
security boundary. CPython documents that audit hooks are not a sandbox: code set on getting out can still do
so, by memory corruption (a C extension, a crafted ``marshal``/pickle payload, a bug in the interpreter), by
racing a path between the hook's check and the call (threads rewriting a ``pathlib`` path, for one), by
monkeypatching the Python library code that the hook trusts, or by routes nobody listed. There is no network
namespace (only the hook stands between the code and the network), no seccomp filter (every system call the
interpreter makes is allowed), and no filesystem namespace; :func:`run_python` has no audit hook at all, so
its code can read and write whatever the user can and open sockets. That is enough for a policy's honest
mistakes and the shortcuts it stumbles on; code from a hostile party needs a container or VM (gVisor,
firejail, nsjail, a throwaway VM).

A reward hack this does not stop, because it lives in the tests: the solution shares the tests' namespace, so
an object whose ``__eq__`` always returns True makes ``assert f(x) == y`` pass, and a solution can rebind any
name or module attribute the tests use (``math.isclose = lambda *a, **k: True``). Write tests that compare
with builtin types and literals (``r = add(1, 2); assert type(r) is int and r == 3``).

The limits are set by a small launcher that execs the real interpreter, rather than in ``preexec_fn``: the
trainer has threads (tokenizers, data loaders, the judge's pool), and Python documents ``preexec_fn`` as
unsafe with threads (the forked child may deadlock before ``exec``).
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
NPROC_HEADROOM = 32  # tasks the child may add to the user's current count (RLIMIT_NPROC; not for root)
REPORT_LIMIT = 4096  # bytes of the harness's report read back

# Runs as `python -I -c _LAUNCHER <memory bytes> <cpu seconds> <fsize bytes> <nofile> <nproc> ARGS...`: sets
# the limits (soft == hard, so the child cannot raise them again; nproc 0: leave RLIMIT_NPROC alone) and
# replaces itself with `python ARGS...`.
_LAUNCHER = """
import os, resource, sys
memory, cpu, fsize, nofile, nproc = map(int, sys.argv[1:6])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
if nproc > 0:
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    if hard != resource.RLIM_INFINITY:
        nproc = min(nproc, hard)  # an unprivileged process cannot raise its hard limit
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
os.execv(sys.executable, [sys.executable, *sys.argv[6:]])
"""

# The harness of run_tests (module docstring), run as `python -I -B -c _HARNESS <report path> <tests path>
# <main.py path>` in the work directory, with the token and a newline on stdin. Everything the code under test
# can reach is assumed tampered with: `_main`'s frame (via sys._getframe), this module's globals, `builtins`.
# So the token lives only in the `_reporter` generator's frame, which only the `_gate` generator releases,
# which only a call from `_main`'s own frame releases (the solution's code runs in frames above it, never in
# it); the audit hook refuses `gi_frame` on both, and the hook closes over all it uses (no global or builtin
# names) and is referenced by nothing but the interpreter.
_HARNESS = r'''
import os
import sys


def _read_token():
    """The run's token from stdin; stdin is then /dev/null, so the code under test finds nothing there."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 256)
        if not chunk:
            break
        data += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return data.strip()


def _reporter(token, fd, write, exit_, getframe, gate_frame):
    """Holds the token; writes it and ends the process when sent to from the gate's frame, and only then."""
    yield
    if getframe(1) is gate_frame:
        write(fd, token)
        exit_(0)


def _gate(box, getframe, main_frame):
    """Forwards to the reporter when sent to from `_main`'s frame: code that finds this object (in `_main`'s
    locals) and sends to it from its own frames only uses it up, which fails the run."""
    reporter = box.pop()
    yield
    if getframe(1) is main_frame:
        reporter.send(None)


def _refused(*args, **kwargs):
    raise PermissionError("sandbox: creating processes and sending signals is not allowed")


def _no_builtin_modules(spec):
    raise ImportError("sandbox: creating built-in modules again is not allowed")


def _guard(work, read_roots, devices, protected, path_types, path_fspath, path_str, pathlib_dict,
           builtins_dict):
    """The audit hook. It closes over everything it uses and names no global or builtin: the code under test
    can rewrite this module's globals and the builtins module, but cannot reach the hook or its cells."""
    lstat, stat, readlink, getcwd, fspath = os.lstat, os.stat, os.readlink, os.getcwd, os.fspath
    type_, str_, bytes_, int_, repr_, direntry = type, str, bytes, int, repr, os.DirEntry
    OSError_, PermissionError_ = OSError, PermissionError
    RuntimeError_, ImportError_ = RuntimeError, ImportError
    writes = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    work_prefix = work + "/"
    read_prefixes = tuple(root + "/" for root in read_roots)
    READ, WRITE, OPEN_READ, OPEN_WRITE = 1, 2, 3, 4
    process_events = frozenset({
        "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
        "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile"})
    refused_events = frozenset({
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "resource.setrlimit", "resource.prlimit",
        "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "cpython.PyInterpreterState_New",
        "sys.monitoring.register_callback", "sqlite3.enable_load_extension", "sqlite3.load_extension",
        "os.symlink"})
    network_events = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"})
    refused_modules = frozenset({
        "ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
        "_interpchannels", "_interpqueues"})
    refused_prefixes = ("ctypes.", "_test", "_ctypes_test")
    # event -> ((position of a path argument, position of its dir_fd or -1), ...), what is done to the paths.
    # A read-only view (mappingproxy): a frame of this hook that leaks (to a signal handler, say) shows it but
    # cannot change it.
    plain = ((0, -1),)
    file_events = type(type.__dict__)({
        "open": (plain, OPEN_READ), "os.listdir": (plain, READ), "os.scandir": (plain, READ),
        "os.getxattr": (plain, READ), "os.listxattr": (plain, READ), "os.chdir": (plain, WRITE),
        "os.remove": (((0, 1),), WRITE), "os.rmdir": (((0, 1),), WRITE), "os.mkdir": (((0, 2),), WRITE),
        "os.rename": (((0, 2), (1, 3)), WRITE), "os.link": (((0, 2), (1, 3)), WRITE),
        "os.truncate": (plain, WRITE), "os.chmod": (((0, 2),), WRITE), "os.chown": (((0, 3),), WRITE),
        "os.utime": (((0, 3),), WRITE), "os.setxattr": (plain, WRITE), "os.removexattr": (plain, WRITE),
        "os.chflags": (plain, WRITE), "os.lchflags": (plain, WRITE), "shutil.rmtree": (((0, 1),), WRITE),
        "sqlite3.connect": (plain, OPEN_WRITE)})
    gate, reporter = protected

    def hook(event, args):
        if event in file_events:
            arguments, need = file_events[event]
        elif event in process_events:
            raise PermissionError_("sandbox: " + event + " is not allowed: no new processes or signals")
        elif event in network_events:
            raise PermissionError_("sandbox: " + event + " is not allowed: no network")
        elif event in refused_events:
            raise PermissionError_("sandbox: " + event + " is not allowed")
        elif event == "import":
            name = args[0]
            if type_(name) is str_ and (name in refused_modules or name.startswith(refused_prefixes)):
                raise ImportError_("sandbox: importing " + name + " is not allowed")
            return
        elif event == "object.__getattr__":
            if args[0] is gate or args[0] is reporter:
                raise PermissionError_("sandbox: the harness's frames are not allowed")
            return
        elif event == "object.__setattr__":
            if args[0] is path_fspath or args[0] is path_str:
                raise PermissionError_("sandbox: changing pathlib's path conversion is not allowed")
            return
        elif event == "sys.addaudithook":
            raise RuntimeError_("sandbox: adding audit hooks is not allowed")
        else:
            return
        if event == "open":
            if type_(args[0]) is int_:
                return  # a descriptor that is already open
            flags = args[2]
            if type_(flags) is not int_ or flags & writes:
                need = OPEN_WRITE
        elif event == "sqlite3.connect":
            if type_(args[0]) is str_ and (args[0] == "" or args[0] == ":memory:"):
                return
            if type_(args[0]) is str_ and args[0].startswith("file:"):
                raise PermissionError_("sandbox: sqlite3 URIs are not allowed")
        for at, dir_fd_at in arguments:
            path = args[at]
            dir_fd = (args[dir_fd_at:dir_fd_at + 1] or (None,))[0] if dir_fd_at >= 0 else None
            kind = type_(path)
            if path is None:
                path = "."  # os.listdir() and friends: the working directory
            elif kind is int_:
                if need == READ or event == "os.chdir" or event == "os.truncate":
                    continue  # listing, entering or truncating through a descriptor opened under the fence
                path = readlink("/proc/self/fd/%d" % path)  # chmod, chown, utime... by descriptor: its file
            elif kind is bytes_:
                path = path.decode("utf-8", "surrogateescape")
            elif kind is not str_:
                # A path object is converted by the call before the event and again here; only types whose
                # conversion cannot change in between (os.DirEntry, unpatched pathlib paths) are accepted.
                if not (kind is direntry or (kind in path_types and kind.__fspath__ is path_fspath
                                             and kind.__str__ is path_str and "str" not in pathlib_dict
                                             and builtins_dict.get("str") is str_)):
                    raise PermissionError_("sandbox: paths must be str, bytes, os.DirEntry or pathlib paths")
                path = fspath(path)
                if type_(path) is bytes_:
                    path = path.decode("utf-8", "surrogateescape")
            if type_(path) is not str_:
                raise PermissionError_("sandbox: unexpected path argument")
            # Resolve the path the way the kernel will: from the root, the dir_fd or the working directory,
            # following symlinks (a nonexistent rest is taken as written).
            if path.startswith("/"):
                base = ""
            elif type_(dir_fd) is int_ and dir_fd >= 0:
                base = readlink("/proc/self/fd/%d" % dir_fd)
            else:
                base = getcwd()
            pending = (base + "/" + path).split("/")
            pending.reverse()
            where, hops = "", 0
            while pending:
                name = pending.pop()
                if name == "" or name == ".":
                    continue
                if name == "..":
                    where = where.rpartition("/")[0]
                    continue
                step = where + "/" + name
                try:
                    mode = lstat(step).st_mode
                except OSError_:
                    where = step
                    continue
                if mode & 0o170000 != 0o120000:
                    where = step
                    continue
                hops += 1
                if hops > 40:
                    raise PermissionError_("sandbox: too many levels of symbolic links in " + repr_(path))
                target = readlink(step)
                if target.startswith("/"):
                    where = ""
                more = target.split("/")
                more.reverse()
                pending += more
            where = where or "/"
            if where in devices:
                continue
            in_work = where == work or where.startswith(work_prefix)
            if need == READ or need == OPEN_READ:
                if not (in_work or where in read_roots or where.startswith(read_prefixes)):
                    raise PermissionError_("sandbox: reading " + repr_(path) + " is not allowed: " + where +
                                           " is outside the working directory and the Python installation")
            elif not in_work:
                doing = "writing" if event == "open" else event
                raise PermissionError_("sandbox: " + doing + " " + repr_(path) + " is not allowed: " + where +
                                       " is outside the working directory")
            if need == OPEN_READ or need == OPEN_WRITE:
                try:
                    mode = stat(where).st_mode & 0o170000
                except OSError_:
                    continue
                if mode == 0o020000 or mode == 0o060000:
                    raise PermissionError_("sandbox: opening the device " + where + " is not allowed")
                if mode == 0o040000 and not in_work:
                    raise PermissionError_("sandbox: opening the directory " + where + " is not allowed")

    return hook


def _describe(error):
    if isinstance(error, SystemExit):
        return f"SystemExit({error.code!r}): the code ended the process before the tests finished"
    return f"{type(error).__name__}: {error}"


def _print_error(error, err, sources):
    import linecache
    import traceback

    for path, source in sources:  # the tests file is outside the fence: let the traceback show its lines
        linecache.cache[path] = (len(source), None, source.splitlines(True), path)
    tb = error.__traceback__
    traceback.print_exception(type(error), error, tb.tb_next if tb is not None else None, file=err)


def _main():
    report_path, tests_path, main_path = sys.argv[1:4]
    write, exit_, run, getframe = os.write, os._exit, exec, sys._getframe
    here = getframe()
    box = []
    gate = _gate(box, getframe, here)
    report = os.open(report_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    reporter = _reporter(_read_token(), report, write, exit_, getframe, gate.gi_frame)
    next(reporter)
    box.append(reporter)
    next(gate)
    out, err = sys.stdout, sys.stderr
    with open(main_path, encoding="utf-8") as f:
        code_source = f.read()
    with open(tests_path, encoding="utf-8") as f:
        tests_source = f.read()
    sources = ((main_path, code_source), (tests_path, tests_source))
    error = None
    try:
        code = compile(code_source, main_path, "exec", dont_inherit=True, optimize=0)
        tests = compile(tests_source, tests_path, "exec", dont_inherit=True, optimize=0)
    except BaseException as e:
        error = e
    if error is None:
        import _imp
        import _posixsubprocess
        import _signal
        import builtins
        import pathlib
        import signal

        # No event guards these: replace them, and make the fresh copies that would bring them back
        # unreachable (every built-in module is imported now, so importlib never needs _imp.create_builtin).
        for name in sys.builtin_module_names:
            __import__(name)
        _posixsubprocess.fork_exec = _refused
        for module in (_signal, signal):
            if hasattr(module, "pidfd_send_signal"):
                module.pidfd_send_signal = _refused
        _imp.create_builtin = _no_builtin_modules
        real = os.path.realpath
        work = real(os.path.dirname(main_path))
        roots = {real(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
        devices = frozenset(real(p) for p in ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"))
        path_types = frozenset({pathlib.PurePosixPath, pathlib.PosixPath})
        sys.addaudithook(_guard(work, tuple(sorted(roots)), devices, (gate, reporter), path_types,
                                pathlib.PurePath.__fspath__, pathlib.PurePath.__str__, pathlib.__dict__,
                                builtins.__dict__))
        del reporter, box  # the reporter lives on in the gate's frame and the hook only
        module = type(sys)("__main__")
        namespace = module.__dict__
        namespace.update(__file__=main_path, __builtins__=builtins, __cached__=None)
        sys.modules["__main__"] = module
        sys.argv = ["main.py"]
        clean_builtins = dict(builtins.__dict__)
        try:
            run(code, namespace)
            namespace["__builtins__"] = clean_builtins  # the solution's changes to builtins stay its own
            run(tests, namespace)
        except BaseException as e:  # SystemExit included: a script that ends itself has not passed
            error = e
        else:
            for stream in (out, err):
                try:
                    stream.flush()  # os._exit does not flush
                except BaseException:
                    pass
            try:
                gate.send(None)  # writes the token and ends the process; returns only if it was tampered with
            except BaseException as e:
                error = e
            if error is None:
                error = RuntimeError("the harness's report channel was tampered with")
    reason = "the harness failed"
    try:
        reason = _describe(error)
        _print_error(error, err, sources)
    except BaseException:
        pass
    try:
        write(report, ("FAIL " + reason[:500]).encode("utf-8", "replace"))
        for stream in (out, err):
            stream.flush()
    finally:
        exit_(1)


_main()
'''


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # negative: killed by that signal (-9 after a timeout, -24 SIGXCPU at the CPU limit)
    stdout: str
    stderr: str
    timed_out: bool  # the wall-clock timeout expired and the process group was killed


@dataclass(frozen=True)
class TestsResult:
    __test__ = False  # not a pytest test class, despite the name

    passed: bool  # the harness reported that the solution and then the tests ran to their end
    reason: str  # a short why, for logs: "passed", "AssertionError: ...", "SystemExit(0): ...", "timed out"
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def run(self) -> SandboxResult:
        """The process's side alone, as :func:`run_python` reports it."""
        return SandboxResult(self.returncode, self.stdout, self.stderr, self.timed_out)


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


def _user_tasks() -> int | None:
    """The real user's tasks (threads), as RLIMIT_NPROC counts them; None without a readable /proc."""
    uid, total = str(os.getuid()), 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [uid]:
            total += int(fields.get("Threads", "1"))
    return total or None


def _nproc_limit() -> int:
    """RLIMIT_NPROC for a child: the user's tasks + headroom, or 0 (leave it) for root or without /proc."""
    if os.getuid() == 0:
        return 0  # root ignores RLIMIT_NPROC; the harness's audit hook is the guard
    tasks = _user_tasks()
    return 0 if tasks is None else tasks + NPROC_HEADROOM


def _spawn(tmp: Path, args: list[str], timeout: float, memory_mb: int, stdin: bytes | None) -> SandboxResult:
    """Run ``python ARGS`` in ``tmp/work`` under the limits, stdout and stderr into files in ``tmp``."""
    work, stdout_path, stderr_path = tmp / "work", tmp / "stdout", tmp / "stderr"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "HOME": str(work), "TMPDIR": str(work)}
    limits = [memory_mb * 1024 * 1024, int(timeout) + 1, FILE_SIZE_LIMIT, OPEN_FILES_LIMIT, _nproc_limit()]
    command = [sys.executable, "-I", "-c", _LAUNCHER, *map(str, limits), *args]
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=err, start_new_session=True,
                                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE)
        if stdin is not None:
            try:  # a few bytes: the pipe buffer takes them without waiting for the child
                proc.stdin.write(stdin)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the child died before reading; its exit status says why
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # on timeout, and any child left running after a normal exit
        proc.wait()
    return SandboxResult(proc.returncode, _read_capped(stdout_path), _read_capped(stderr_path), timed_out)


def _check_limits(name: str, timeout: float, memory_mb: int) -> None:
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"{name}: timeout ({timeout}) and memory_mb ({memory_mb}) must be positive")


def run_python(source: str, timeout: float, memory_mb: int) -> SandboxResult:
    """Run ``source`` as a Python script under the limits above; never raises for anything the code does.

    Its exit status is only the script's word: code that calls ``sys.exit(0)`` exits 0. To check a solution
    against tests, use :func:`run_tests`."""
    _check_limits("run_python", timeout, memory_mb)
    with tempfile.TemporaryDirectory(prefix="posttrain-sandbox-") as tmp:
        # The code runs in work/; its captured output lives beside it, out of its directory listing.
        work = Path(tmp) / "work"
        work.mkdir()
        (work / "main.py").write_text(source, encoding="utf-8")
        return _spawn(Path(tmp), ["-I", "main.py"], timeout, memory_mb, stdin=None)


def run_tests(code: str, tests: str, timeout: float, memory_mb: int) -> TestsResult:
    """Run ``code`` and then ``tests`` under the harness and the limits above (module docstring); ``passed``
    only when the harness reported that both ran to their end. Never raises for anything the code does."""
    _check_limits("run_tests", timeout, memory_mb)
    token = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="posttrain-sandbox-") as tmp:
        # work/ holds main.py (the code); the tests, the report and the captured output are outside it, where
        # the child's fence keeps the code from reading or writing them.
        root = Path(tmp)
        work, tests_path, report_path = root / "work", root / "tests.py", root / "report"
        work.mkdir()
        (work / "main.py").write_text(code, encoding="utf-8", errors="surrogatepass")
        tests_path.write_text(tests, encoding="utf-8", errors="surrogatepass")
        report_path.write_bytes(b"")
        args = ["-I", "-B", "-c", _HARNESS, str(report_path), str(tests_path), str(work / "main.py")]
        result = _spawn(root, args, timeout, memory_mb, stdin=token.encode() + b"\n")
        with report_path.open("rb") as f:
            report = f.read(REPORT_LIMIT).decode("utf-8", errors="replace")
    passed = result.returncode == 0 and not result.timed_out and report == token
    if passed:
        reason = "passed"
    elif result.timed_out:
        reason = f"timed out after {timeout:g} s"
    elif report.startswith("FAIL "):
        reason = report[5:]  # the harness's account, e.g. "AssertionError: ..." or "SystemExit(0): ..."
    elif result.returncode < 0:
        number = -result.returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else "?"
        reason = f"killed by signal {number} ({name})"
    elif result.returncode == 0:
        reason = "exit status 0 without the harness's report: the code ended the process (os._exit?)"
    else:
        reason = f"exit status {result.returncode} without the harness's report"
    return TestsResult(passed, reason, result.returncode, result.stdout, result.stderr, result.timed_out)
