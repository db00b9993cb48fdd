"""The ``posttrain`` command line: ``posttrain <stage> [CONFIG.yaml] [key=value ...]``.

Every command takes an optional YAML config and dotted overrides; ``posttrain <stage> --help`` lists every
key with its default and meaning. Errors a user can cause are printed without a traceback (exit 2).
Multi-process: ``accelerate launch -m posttrain sft cfg.yaml`` or ``torchrun --nproc_per_node N -m posttrain sft ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from posttrain.commands import COMMANDS, command
from posttrain.errors import PosttrainError


def _keys_help(cls: type) -> str:
    from posttrain.config import help_table

    rows = help_table(cls)
    width = max(len(k) for k, _, _ in rows)
    lines = []
    for key, default, text in rows:
        wrapped = textwrap.wrap(f"{text} [default: {default}]", width=max(40, 100 - width)) or [""]
        lines.append(f"  {key.ljust(width)}  {wrapped[0]}")
        lines.extend(f"  {' ' * width}  {w}" for w in wrapped[1:])
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-train LLMs: SFT, reward models, DPO/KTO, GRPO/PPO, by full fine-tuning, LoRA/DoRA, QLoRA, prompt or prefix tuning.",
        epilog="Run `posttrain <command> --help` for every key of a command.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<command>")
    for name in COMMANDS:
        mod = command(name)
        if not hasattr(mod, "Config"):  # its own subcommands and flags: `main(argv)` parses them
            sub.add_parser(name, help=mod.HELP)
            continue
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=f"{mod.HELP}\n\nUsage: posttrain {name} [CONFIG.yaml] [key=value ...]\n"
            "Dotted keys override the YAML file; values are YAML scalars or lists.",
            epilog=f"keys:\n{_keys_help(mod.Config)}\n\nexamples:\n  {mod.EXAMPLES}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
        for flag, (_, text) in getattr(mod, "FLAGS", {}).items():
            p.add_argument(flag, action="store_true", help=text)
    return parser


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    config, overrides = None, []
    for i, a in enumerate(args):
        if i == 0 and "=" not in a:
            config = a
        elif "=" not in a:
            raise PosttrainError(f"argument '{a}': expected key=value (only the first argument may be a config file)")
        else:
            overrides.append(a)
    return config, overrides


def quiet_known_warnings() -> None:
    """Silence library notices a user cannot act on (PEFT reads a transformers property that transformers
    deprecated; bitsandbytes' hub kernel lookup); posttrain's own messages are unaffected."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes on AVX512-BF16 CPUs tries to fetch a kernel from the Hugging Face hub at import and logs a
    # warning when it cannot (offline, or untrusted); its own CPU path is used either way.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run a command; a closed output pipe (``posttrain plan table=true | head``) ends it quietly, status 141 as a
    process killed by SIGPIPE, instead of a traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Python's documented pattern: point stdout at devnull so the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_warnings()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS and hasattr(mod := command(argv[0]), "main"):
        return mod.main(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.stage is None:
        parser.print_help()
        return 2
    mod = command(ns.stage)
    try:
        config_path, overrides = _split_args(ns.args)
        for flag, (override, _) in getattr(mod, "FLAGS", {}).items():
            if getattr(ns, flag.lstrip("-").replace("-", "_")):
                overrides.append(override)
        from posttrain.config import load

        mod.run(load(mod.Config, config_path, overrides))
    except PosttrainError as e:
        print(f"posttrain {ns.stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
