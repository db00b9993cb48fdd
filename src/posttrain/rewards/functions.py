"""Reward functions named in config (``"module:function"`` or ``"path/to/file.py:function"``), as batch sources.

Every reward source is an object with ``.name``, ``.errors`` (rows that got no score, so far) and
``__call__(prompts, completions, rows) -> list[float]``; a row that could not be scored is ``nan``, so one bad
completion never stops training and the trainer can report how many there were.

The project rule: user-supplied reward code never runs outside a subprocess with a time limit. So:

- :class:`FunctionReward` evaluates a user function in a persistent worker (:mod:`posttrain.rewards.worker`).
  Construction starts the worker, which imports the ref; a bad ref is a ConfigError then, not at the first
  batch. A batch that runs past ``timeout`` kills the worker: the rows it had not answered are ``nan`` and the
  next batch starts a fresh worker. A row whose call raises or returns a non-number is ``nan``; the rest go on.
- :class:`VerifierReward` runs the shipped verifiers (:mod:`posttrain.rewards.verifiers`) in-process: they are
  our code, pure and fast, and the one that executes code (``code_tests``) does so in the sandbox.

:func:`load_reward_function` picks one from the ref. Each call merges the row's columns with the source's
``kwargs`` (``kwargs`` win: a setting written in the config is not overridden by a data column of that name).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import posttrain
from posttrain.errors import ConfigError
from posttrain.rewards.verifiers import VERIFIERS, check_kwargs
from posttrain.rewards.worker import split_ref

VERIFIER_MODULE = "posttrain.rewards.verifiers"
IMPORT_TIMEOUT_S = 60.0  # for the worker to start and import the user's module
_RESERVED = ("prompt", "completion")


def _check_batch(prompts: list, completions: list, rows: list) -> None:
    if not len(prompts) == len(completions) == len(rows):
        raise ValueError(f"reward batch: {len(prompts)} prompts, {len(completions)} completions and {len(rows)} "
                         "rows; expected one of each per sample")


def _call_kwargs(kwargs: dict, row: dict) -> dict:
    return {**{k: v for k, v in row.items() if k not in _RESERVED}, **kwargs}


def _checked_kwargs(kwargs: dict | None, name: str) -> dict:
    kwargs = dict(kwargs or {})
    clash = [k for k in _RESERVED if k in kwargs]
    if clash:
        raise ConfigError(f"reward {name!r}: kwargs may not set {clash}; prompt and completion come from the batch")
    return kwargs


class VerifierReward:
    """A shipped verifier as a batch source, run in-process (``code_tests`` rows in parallel sandboxes)."""

    def __init__(self, fn: Callable, kwargs: dict | None = None, name: str | None = None):
        self.fn, self.name = fn, name or fn.__name__
        self.kwargs = _checked_kwargs(kwargs, self.name)
        check_kwargs(fn.__name__, self.kwargs)
        self.errors, self.last_error = 0, None
        parameters = list(inspect.signature(fn).parameters.values())[2:]  # after prompt, completion
        self.required = [p.name for p in parameters if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
        # code_tests waits on subprocesses; the others are microseconds of Python, not worth a thread.
        self.threads = (os.cpu_count() or 1) if fn.__name__ == "code_tests" else 1

    def _score(self, index: int, prompt, completion: str, row: dict) -> float | str:
        """The score, or the error message for this row. ConfigError propagates: it is the same for every row."""
        call_kwargs = _call_kwargs(self.kwargs, row)
        missing = [k for k in self.required if k not in call_kwargs]
        if missing:
            raise ConfigError(f"reward {self.name!r}: row {index} has no {missing} (its columns: {sorted(row)}); "
                              "add the column to the data or set it in this source's kwargs")
        try:
            return float(self.fn(prompt, completion, **call_kwargs))
        except ConfigError:
            raise
        except Exception as e:
            return f"row {index}: {type(e).__name__}: {e}"

    def __call__(self, prompts: list, completions: list[str], rows: list[dict]) -> list[float]:
        _check_batch(prompts, completions, rows)
        args = list(zip(range(len(rows)), prompts, completions, rows))
        if self.threads > 1 and len(args) > 1:
            with ThreadPoolExecutor(min(self.threads, len(args))) as pool:
                results = list(pool.map(lambda a: self._score(*a), args))
        else:
            results = [self._score(*a) for a in args]
        for result in results:
            if isinstance(result, str):
                self.errors, self.last_error = self.errors + 1, f"{self.name}: {result}"
        return [math.nan if isinstance(r, str) else r for r in results]

    def close(self) -> None:
        pass  # nothing to release; here so every source can be closed the same way

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop(proc: subprocess.Popen) -> None:
    """Ask the worker to exit (end of input), then kill it if it is busy."""
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
    proc.stdout.close()


class FunctionReward:
    """A user reward function run in a worker subprocess; ``timeout`` bounds each batch, in seconds."""

    def __init__(self, ref: str, kwargs: dict | None = None, timeout: float = 30.0, name: str | None = None):
        if not timeout > 0:
            raise ConfigError(f"reward function {ref!r}: timeout must be > 0 seconds, got {timeout}")
        module, attr = split_ref(ref)
        self.ref, self.timeout, self.name = ref, float(timeout), name or attr
        self._worker_ref = f"{module}:{attr}"  # with a file path made absolute
        self.kwargs = _checked_kwargs(kwargs, self.name)
        self.errors, self.last_error = 0, None
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._pending = b""  # bytes read past the last complete line
        self._lock = threading.Lock()
        self._start()  # validates the ref, in the subprocess

    # -- the worker process -------------------------------------------------------------------------------------

    def _start(self) -> None:
        env = dict(os.environ)
        # The worker runs `-m posttrain.rewards.worker`: make this posttrain importable even when it is not
        # installed; `-m` also puts the working directory first on sys.path, as for `python -m` in a shell.
        source_root = str(Path(posttrain.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen([sys.executable, "-m", "posttrain.rewards.worker", self._worker_ref],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._finalizer = weakref.finalize(self, _stop, self._proc)  # also runs at interpreter exit
        self._pending = b""
        try:
            message = self._read_message(time.monotonic() + IMPORT_TIMEOUT_S)
        except EOFError:
            message = {"error": f"the worker exited with status {self._kill()} while importing it (its stderr "
                                "is above)"}
        if message is None:
            self._kill()
            message = {"error": f"importing it took over {IMPORT_TIMEOUT_S:.0f} s"}
        if "error" in message:
            self._kill()
            error = message["error"]
            raise ConfigError(error if error.startswith("reward function") else f"reward function {self.ref!r}: {error}")

    def _kill(self) -> int | None:
        """Kill the worker now; returns its exit status."""
        if self._proc is None:
            return None
        self._finalizer.detach()
        self._proc.kill()
        status = self._proc.wait()
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._proc = None
        return status

    def _read_message(self, deadline: float) -> dict | None:
        """The worker's next message, None if ``deadline`` (time.monotonic) passes first; EOFError if it died."""
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._proc.stdout], [], [], remaining)[0]:
                return None
            chunk = os.read(self._proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise EOFError
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    # -- the batch interface ------------------------------------------------------------------------------------

    def _fail(self, count: int, message: str) -> None:
        self.errors, self.last_error = self.errors + count, f"{self.name}: {message}"

    def __call__(self, prompts: list, completions: list[str], rows: list[dict]) -> list[float]:
        _check_batch(prompts, completions, rows)
        if not rows:
            return []
        try:
            payload = json.dumps({"prompts": prompts, "completions": completions,
                                  "rows": [_call_kwargs(self.kwargs, row) for row in rows]}).encode() + b"\n"
        except (TypeError, ValueError) as e:
            raise ConfigError(f"reward {self.name!r}: rows must hold JSON values (str, number, bool, None, list, "
                              f"dict) to reach the worker subprocess: {e}") from None
        scores: list[float] = []
        with self._lock:
            if self._proc is None:
                self._start()  # after a timeout or crash; a ref that no longer imports is a ConfigError
            deadline = time.monotonic() + self.timeout
            try:
                self._proc.stdin.write(payload)
                self._proc.stdin.flush()
                while len(scores) < len(rows):
                    message = self._read_message(deadline)
                    if message is None:
                        self._kill()
                        self._fail(len(rows) - len(scores), f"batch of {len(rows)} timed out after "
                                   f"{self.timeout:g} s with {len(scores)} scored; worker restarted")
                        break
                    if "error" in message:
                        self._fail(1, f"row {len(scores)}: {message['error']}")
                    scores.append(message.get("score", math.nan))
            except (BrokenPipeError, EOFError):
                status = self._kill()
                self._fail(len(rows) - len(scores), f"worker died (exit status {status}) with {len(scores)} of "
                           f"{len(rows)} rows scored; restarting it")
        return scores + [math.nan] * (len(rows) - len(scores))

    def close(self) -> None:
        """Stop the worker (idempotent); a later call starts a new one."""
        with self._lock:
            if self._proc is not None:
                self._finalizer()
                self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_reward_function(ref: str, kwargs: dict | None = None, timeout: float = 30.0,
                         name: str | None = None) -> VerifierReward | FunctionReward:
    """A batch source for ``ref``: a shipped verifier (``exact_match`` or
    ``posttrain.rewards.verifiers:exact_match``) in-process, anything else in a :class:`FunctionReward`."""
    short = ref.removeprefix(VERIFIER_MODULE + ":") if isinstance(ref, str) else ref
    if short in VERIFIERS:
        return VerifierReward(VERIFIERS[short], kwargs, name)
    if isinstance(ref, str) and ref.startswith(VERIFIER_MODULE + ":"):
        raise ConfigError(f"reward function {ref!r}: {VERIFIER_MODULE} has no verifier {short!r}; "
                          f"choose from {sorted(VERIFIERS)}")
    return FunctionReward(ref, kwargs, timeout, name)
