"""The subprocess that runs a user-supplied reward function: ``python -m posttrain.rewards.worker <ref>``.

User reward code never runs in the trainer's process (it could hang, crash or leak into the policy's memory);
:class:`posttrain.rewards.functions.FunctionReward` starts this worker and talks to it in JSON lines:

1. the worker imports ``<ref>`` and writes ``{"ready": true}``, or ``{"error": "<why>"}`` and exits;
2. for each batch the parent writes ``{"prompts": [...], "completions": [...], "rows": [...]}``, and the worker
   writes one line per row, in order: ``{"score": <float>}``, or ``{"error": "<why>"}`` when the function
   raised or returned something other than a number. Rows are answered as they finish, so a batch cut off by
   the parent's timeout keeps the scores it already has.

The protocol owns the worker's original stdin/stdout; the user's code sees ``/dev/null`` as stdin and the
worker's stderr as stdout, so a stray ``print`` cannot corrupt it. The worker exits at end of input, and within
a second of its parent dying (a watchdog thread), so a killed trainer leaves no worker spinning.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import numbers
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from posttrain.errors import ConfigError

REF_FORMS = "'package.module:function' or 'path/to/file.py:function'"


def split_ref(ref: str) -> tuple[str, str]:
    """``"pkg.mod:fn"`` -> ``("pkg.mod", "fn")``; a ``.py`` module part is made an absolute path. Checks the
    form only (nothing is imported), so the trainer can call it on user input."""
    module, sep, attr = ref.rpartition(":") if isinstance(ref, str) else ("", "", "")
    if not sep or not module.strip() or not attr.strip():
        raise ConfigError(f"reward function {ref!r}: expected {REF_FORMS}")
    if module.endswith(".py"):
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"reward function {ref!r}: file {path} does not exist")
        module = str(path)
    return module, attr


def load_function(ref: str) -> Callable:
    """Import ``ref`` and return the callable it names; ConfigError says which part failed and why."""
    module_name, attr = split_ref(ref)
    try:
        if module_name.endswith(".py"):
            # Imported like a script: its directory is on sys.path (for sibling helpers) and it is registered
            # in sys.modules (dataclasses and pickle look their module up there).
            name = f"_posttrain_reward_{Path(module_name).stem}"
            spec = importlib.util.spec_from_file_location(name, module_name)
            module = sys.modules[name] = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(Path(module_name).parent))
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"reward function {ref!r}: module {e.name!r} not found (is it installed, or on the "
                          "path from the working directory?)") from None
    except BaseException as e:  # the user's module is arbitrary code: report any failure, SystemExit included
        raise ConfigError(f"reward function {ref!r}: importing {module_name} raised {type(e).__name__}: {e}") from None
    target = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"reward function {ref!r}: {module_name} has no attribute {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"reward function {ref!r}: {attr} is a {type(target).__name__}, not a callable")
    return target


def score_row(fn: Callable, prompt, completion: str, row: dict) -> dict:
    """``{"score": float}``, or ``{"error": why}`` if ``fn`` raised or returned a non-number."""
    try:
        value = fn(prompt, completion, **row)
    except (Exception, SystemExit) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not isinstance(value, numbers.Real):
        return {"error": f"returned {type(value).__name__} {str(value)[:80]!r}, expected a number"}
    return {"score": float(value)}


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def main(ref: str) -> None:
    protocol_in = os.fdopen(os.dup(0), "rb")
    protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # the user's prints go to stderr

    def send(message: dict) -> None:
        protocol_out.write(json.dumps(message).encode() + b"\n")

    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        fn = load_function(ref)
    except ConfigError as e:
        send({"error": str(e)})
        return
    send({"ready": True})
    for line in protocol_in:
        batch = json.loads(line)
        for prompt, completion, row in zip(batch["prompts"], batch["completions"], batch["rows"], strict=True):
            send(score_row(fn, prompt, completion, row))
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1])
