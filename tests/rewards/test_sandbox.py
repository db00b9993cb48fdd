"""The code_tests harness: a pass is the harness's report after the tests ran, not an exit status, and
the audit hook fences processes, ctypes and files. Each case is one sandboxed interpreter (~0.1 s); the file
takes a few seconds.
"""

from __future__ import annotations

import dis
import importlib.util
import os

import pytest

from posttrain.rewards import sandbox
from posttrain.rewards.sandbox import _nproc_limit, _user_tasks, run_python, run_tests
from posttrain.rewards.verifiers import code_tests

ADD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"


# -- early exits are fails -----------------------------------------------------------------------------------


@pytest.mark.parametrize("exit_early, reason", [
    ("import sys; sys.exit(0)", "SystemExit(0)"),
    ("import os; os._exit(0)", "exit status 0 without the harness's report"),
    ("raise SystemExit", "SystemExit(None)"),
    ("raise SystemExit(0)", "SystemExit(0)"),
])
def test_exiting_before_the_tests_is_a_fail(exit_early, reason):
    hack = f"```python\n{ADD}{exit_early}\n```"
    assert code_tests("q", f"```python\n{ADD}```", tests=TESTS) == 1.0
    assert code_tests("q", hack, tests=TESTS) == 0.0
    # The exit status alone, which code_tests used to reward, reads as a pass for every one of these.
    assert run_python(f"{ADD}{exit_early}\n{TESTS}", timeout=5, memory_mb=512).returncode == 0
    result = run_tests(f"{ADD}{exit_early}\n", TESTS, timeout=5, memory_mb=512)
    assert not result.passed and result.returncode in (0, 1) and result.reason.startswith(reason)


def test_a_pass_keeps_the_output_and_a_failing_assert_says_so():
    passed = run_tests(ADD + "print('hello from the solution')\n", TESTS, timeout=5, memory_mb=512)
    assert passed.passed and passed.reason == "passed" and passed.returncode == 0
    assert "hello from the solution" in passed.stdout  # flushed before the harness's os._exit
    failed = run_tests("def add(a, b):\n    return a - b\n", TESTS, timeout=5, memory_mb=512)
    assert not failed.passed and failed.reason.startswith("AssertionError") and failed.returncode == 1
    assert "assert add(1, 2) == 3" in failed.stderr  # the traceback shows the tests' line
    broken = run_tests(ADD, "assert add(1, 2) ==", timeout=5, memory_mb=512)
    assert not broken.passed and broken.reason.startswith("SyntaxError")


def test_the_token_is_nowhere_the_code_can_read(monkeypatch):
    # The code gathers what it can from the places that could carry a token (its own file, the environment,
    # argv, stdin, every descriptor) and writes it to every descriptor before exiting 0: still no pass.
    token = "0123456789abcdef" * 2
    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n: token)
    snoop = ADD + """
import os, sys
seen = [open(__file__).read(), repr(dict(os.environ)), repr(sys.argv), repr(sys.orig_argv), sys.stdin.read(),
        repr(os.read(0, 4096))]
for fd in range(3, 64):
    try:
        seen.append(repr(os.read(fd, 4096)))
    except OSError:
        pass
print("\\n".join(seen))
sys.stdout.flush()
for fd in range(3, 64):
    for found in seen:
        try:
            os.write(fd, found.encode())
        except OSError:
            pass
os._exit(0)
"""
    result = run_tests(snoop, TESTS, timeout=5, memory_mb=512)
    assert not result.passed and result.returncode == 0
    assert "posttrain-sandbox-" in result.stdout and token not in result.stdout


def test_the_harness_cannot_be_talked_into_reporting():
    # Its gate is reachable through sys._getframe, but only the harness's own frame can open it.
    forge = ADD + "import sys\nsys._getframe(1).f_locals['gate'].send(None)\n"
    assert not run_tests(forge, TESTS, timeout=5, memory_mb=512).passed
    peek = ADD + "import sys\nprint(sys._getframe(1).f_locals['gate'].gi_frame.f_locals)\n"
    assert "frames are not allowed" in run_tests(peek, TESTS, timeout=5, memory_mb=512).reason
    # Rewriting builtins neither skips the tests (the harness saved exec) nor reaches them (fresh builtins).
    skip = "def add(a, b):\n    return 0\nimport builtins\nbuiltins.exec = builtins.compile = print\n"
    assert code_tests("q", skip, tests=TESTS) == 0.0
    lie = "def add(a, b):\n    return '3'\nimport builtins\nbuiltins.type = lambda x: int\n"
    assert code_tests("q", lie, tests="assert type(add(1, 2)) is int") == 0.0


def test_the_hook_names_no_global():
    # The code under test can rewrite the harness's globals and builtins; the hook must not look any name up.
    namespace: dict = {"__name__": "harness"}
    exec(compile(sandbox._HARNESS.replace("\n_main()\n", "\n"), "harness", "exec"), namespace)

    def codes(code):
        yield code
        for const in code.co_consts:
            if hasattr(const, "co_code"):
                yield from codes(const)

    hook = next(c for c in codes(namespace["_guard"].__code__) if c.co_name == "hook")
    for code in (hook, namespace["_reporter"].__code__, namespace["_gate"].__code__):
        names = [i.argval for i in dis.get_instructions(code) if "GLOBAL" in i.opname or "NAME" in i.opname]
        assert names == [], (code.co_name, names)


# -- the fence -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spawn, event", [
    ("import os\nif os.fork() == 0:\n    os._exit(0)", "os.fork"),
    ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
    ("import os\nos.system('true')", "os.system"),
    ("import os\nos.posix_spawn('/bin/true', ['true'], {})", "os.posix_spawn"),
    ("import multiprocessing as mp\np = mp.Process(target=print)\np.start()", "os.fork"),
    ("import _posixsubprocess\n_posixsubprocess.fork_exec(*range(23))", "creating processes"),
    ("import os\nos.kill(os.getppid(), 0)", "os.kill"),
])
def test_processes_and_signals_are_refused(spawn, event):
    result = run_tests(ADD + spawn + "\n", TESTS, timeout=5, memory_mb=512)
    assert not result.passed
    assert result.reason.startswith("PermissionError: sandbox:") and event in result.reason


def test_ctypes_and_raised_limits_are_refused():
    for code, message in [("import ctypes", "ImportError: sandbox: importing ctypes"),
                          ("import _testcapi", "ImportError: sandbox: importing _testcapi"),
                          ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
                           "resource.setrlimit"),
                          ("import sys\nsys.settrace(lambda *a: None)", "sys.settrace")]:
        result = run_tests(ADD + code + "\n", TESTS, timeout=5, memory_mb=512)
        assert not result.passed and message in result.reason, code


def test_files_outside_the_folder_cannot_be_changed(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for change in [f"os.remove({str(victim)!r})", f"open({str(victim)!r}, 'w').write('gone')",
                   f"os.rename({str(victim)!r}, 'mine.txt')", f"shutil.rmtree({str(tmp_path)!r})",
                   f"pathlib.Path({str(victim)!r}).unlink()", f"os.link({str(victim)!r}, 'alias')",
                   f"os.chdir({str(tmp_path)!r})\nos.remove('keep.txt')",
                   f"os.symlink({str(tmp_path)!r}, 'door')"]:
        completion = f"{ADD}import os, pathlib, shutil\n{change}\n"
        assert code_tests("q", completion, tests=TESTS) == 0.0, change
        assert victim.read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_files_outside_the_folder_cannot_be_read(tmp_path):
    secret = tmp_path / "answers.txt"
    secret.write_text("42")
    for read in [f"open({str(secret)!r}).read()", f"os.listdir({str(tmp_path)!r})",
                 "open('/proc/self/mem', 'rb')", "open('../tests.py').read()",
                 f"os.open({str(tmp_path)!r}, os.O_RDONLY)"]:
        result = run_tests(f"{ADD}import os\n{read}\n", TESTS, timeout=5, memory_mb=512)
        assert not result.passed and result.reason.startswith("PermissionError: sandbox: reading"), read
        assert "is not allowed" in result.reason


def test_imports_and_the_own_folder_still_work():
    has_numpy = importlib.util.find_spec("numpy") is not None
    numpy = "import numpy\nassert int(numpy.arange(4).sum()) == 6\n" if has_numpy else ""
    code = ADD + "import json, math, collections, re, asyncio, dataclasses, typing, tempfile, pathlib\n" + \
        "import os, shutil\n" + numpy + """
assert json.loads('[1]') == [1] and re.match('a', 'a') and math.isqrt(9) == 3
assert asyncio.run(asyncio.sleep(0, 'ok')) == 'ok'
with open('notes.txt', 'w') as f:
    f.write('mine')
os.mkdir('d')
os.rename('notes.txt', 'd/notes.txt')
assert os.listdir('d') == ['notes.txt'] and open('d/notes.txt').read() == 'mine'
pathlib.Path('p').mkdir()
(pathlib.Path('p') / 'x').touch()
assert [e.name for e in pathlib.Path('p').iterdir()] == ['x']
fd, name = tempfile.mkstemp()
os.close(fd)
os.remove(name)
shutil.rmtree('d')
open(os.devnull, 'w').write('dropped')
assert len(os.urandom(8)) == 8
"""
    result = run_tests(code, TESTS, timeout=20, memory_mb=512)
    assert result.passed, result.stderr


def test_timeouts_and_memory_limits_still_hold():
    looped = run_tests("while True:\n    pass\n", "pass", timeout=1, memory_mb=512)
    assert not looped.passed and looped.timed_out and looped.reason.startswith("timed out")
    hog = run_tests("blob = bytearray(2 * 1024**3)\n", "pass", timeout=5, memory_mb=256)
    assert not hog.passed and hog.reason.startswith("MemoryError")
    with pytest.raises(ValueError, match="must be positive"):
        run_tests(ADD, TESTS, timeout=5, memory_mb=0)


def test_nproc_limit_is_relative_to_the_users_tasks():
    tasks = _user_tasks()
    assert tasks is None or tasks >= 1  # this process at least, where /proc is readable
    # Root ignores RLIMIT_NPROC (the audit hook is the guard there), so none is set for it.
    assert _nproc_limit() == (0 if os.getuid() == 0 or tasks is None else tasks + sandbox.NPROC_HEADROOM)
