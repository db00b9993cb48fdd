"""code_tests' harness (issue 19, finding 3): a pass is what the harness reports after the tests ran to their end,
through code_tests, and files outside the work directory; tests/rewards/test_sandbox.py has the fence's other events."""

from __future__ import annotations

import pytest

from posttrain.rewards.sandbox import run_python, run_tests
from posttrain.rewards.verifiers import code_tests

ADD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3"


@pytest.mark.parametrize("exit_early", [
    "import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit", "raise SystemExit(0)", "exit()",
    "import posix; posix._exit(0)", "import atexit, os; atexit.register(lambda: None); quit(0)",
])
def test_exiting_before_the_tests_is_a_fail(exit_early):
    assert code_tests("q", ADD, tests=TESTS) == 1.0
    assert code_tests("q", ADD + exit_early + "\n", tests=TESTS) == 0.0
    # what the old check (exit status 0) saw for the same program: a "pass"
    if "atexit" not in exit_early:
        assert run_python(ADD + exit_early + "\n" + TESTS, timeout=10, memory_mb=512).returncode == 0


def test_the_token_is_nowhere_the_code_can_read_it():
    snoop = ADD + (
        "import os, sys\n"
        "found = [sys.stdin.read(), ' '.join(sys.argv), repr(dict(os.environ))]\n"
        "found += [open(name).read() for name in os.listdir('.')]\n"  # solution.py and tests.py
        "for text in found:\n"
        "    for word in text.replace('\\n', ' ').split():\n"
        "        if len(word) == 64 and all(c in '0123456789abcdef' for c in word):\n"
        "            print(word)\n"
        "            for fd in range(3, 64):\n"
        "                try: os.write(fd, word.encode())\n"
        "                except OSError: pass\n"
        "            os._exit(0)\n")
    result = run_tests(snoop, TESTS, timeout=10, memory_mb=512)
    assert result.run.stdout == ""  # nothing token-like in stdin, argv, env or its files (so the tests ran)
    r = run_tests(ADD + "open('../harness.py').read()\n", TESTS, timeout=10, memory_mb=512)
    assert not r.passed and "reading '../harness.py' is not allowed" in r.reason  # nor beside its folder


def test_files_outside_the_work_folder_are_neither_read_nor_changed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("training data")
    attempts = [f"print(open({str(secret)!r}).read())", f"import os; os.remove({str(secret)!r})",
                f"open({str(secret)!r}, 'w').write('gone')", f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                f"import os; os.rename({str(secret)!r}, 'mine.txt')", f"import os; print(os.listdir({str(tmp_path)!r}))",
                f"import os; os.chmod({str(secret)!r}, 0)", "import os; os.symlink('/etc/passwd', 'p'); open('p').read()"]
    for attempt in attempts:
        result = run_tests(ADD + attempt + "\n", TESTS, timeout=10, memory_mb=512)
        assert not result.passed and "sandbox:" in result.reason, (attempt, result.reason)
        assert "training data" not in result.run.stdout
    assert secret.read_text() == "training data"
    # inside its own folder, and the standard library and site-packages, everything works
    inside = ("import json, os, tempfile, numpy\nopen('scratch.txt', 'w').write('x')\nos.mkdir('d')\n"
              "os.rename('scratch.txt', 'd/s.txt')\nassert os.listdir('d') == ['s.txt']\nos.remove('d/s.txt')\n"
              "tempfile.mkdtemp()\nassert numpy.arange(4).sum() == 6\n")
    result = run_tests(ADD + inside, TESTS, timeout=20, memory_mb=1024)
    assert result.passed, result.reason


def test_failures_timeouts_and_syntax_errors_still_fail():
    assert not run_tests(ADD, "assert add(1, 2) == 4", timeout=10, memory_mb=512).passed
    assert "timed out" in run_tests("while True:\n    pass\n", TESTS, timeout=1, memory_mb=512).reason
    assert "SyntaxError" in run_tests("def add(a, b)\n", TESTS, timeout=10, memory_mb=512).reason
    assert "NameError" in run_tests("", TESTS, timeout=10, memory_mb=512).reason
