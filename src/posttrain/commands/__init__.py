"""Every ``posttrain`` command, one module each, registered in :data:`COMMANDS`.

A command module exports ``HELP`` (its one line in ``posttrain --help``) and either

- ``Config`` (a dataclass of typed keys, see :mod:`posttrain.config`), ``EXAMPLES`` and ``run(cfg)``: the CLI
  builds ``Config`` from ``[CONFIG.yaml] [key=value ...]``, validates it and calls ``run``; optional ``FLAGS``
  maps a flag to the override it stands for (``--no-auth`` is ``auth=false``); or
- ``main(argv) -> int``, for commands with their own subcommands and flags (data, feedback, loop, rollback).

Command modules import nothing heavy at the top (torch, transformers), so ``--help`` stays fast; ``run`` imports
the stage or tool it drives. Adding a command: write ``commands/<name>.py`` and add its name here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

COMMANDS = ("sft", "rm", "dpo", "kto", "grpo", "ppo", "score", "generate", "chat", "merge", "eval", "plan", "serve",
            "data", "feedback", "loop", "rollback", "pipeline", "compare", "ui")


def command(name: str) -> ModuleType:
    """The module of command ``name``."""
    if name not in COMMANDS:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")


def config_commands() -> dict[str, ModuleType]:
    """The commands driven by a typed config (all but those with their own ``main``), in help order."""
    return {name: mod for name in COMMANDS if hasattr(mod := command(name), "Config")}


def load_config(name: str, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """The validated config of command ``name`` from an optional YAML file and dotted overrides."""
    from posttrain.config import load

    return load(command(name).Config, path, overrides)


def markdown_reference() -> str:
    """Every config-driven command's keys as Markdown tables (docs/config.md is generated from this)."""
    from posttrain.config import help_table

    seen: dict[type, list[str]] = {}
    for name, mod in config_commands().items():
        seen.setdefault(mod.Config, []).append(name)
    parts = []
    for cls, names in seen.items():
        title = " / ".join(f"`posttrain {s}`" for s in names)
        parts.append(f"#### {title}\n\n| key | default | meaning |\n|---|---|---|")
        for key, default, text in help_table(cls):
            parts.append(f"| `{key}` | `{default}` | {text} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
