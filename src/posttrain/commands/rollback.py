"""``posttrain rollback``: serve an earlier registry version again, audited."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.errors import PosttrainError

HELP = "Serve an earlier registry version again: `posttrain rollback VERSION [CONFIG]`."



def main(argv: list[str]) -> int:
    from posttrain.config import build_config
    from posttrain.loop.registry import Registry
    from posttrain.loop.run import LoopConfig, serve_version

    p = argparse.ArgumentParser(prog="posttrain rollback", description="Serve an earlier version again: the registry "
                                "records it (audit.jsonl) and a running server switches without restart.")
    p.add_argument("version", help="a version id from the registry (e.g. v1)")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value", help="the loop's config (registry, server_url, ...)")
    p.add_argument("--reason", default="", help="why, for the audit log")
    p.add_argument("--override", action="store_true", help="serve a registered candidate that never went through "
                   "the gates (needs --reason; audited). A rejected version never serves, override or not.")
    a = p.parse_args(argv)
    path = a.args[0] if a.args and "=" not in a.args[0] else None
    try:
        cfg = build_config(LoopConfig, path, a.args[1:] if path else a.args, "loop options")
        if not Path(cfg.registry, "registry.json").is_file():
            raise PosttrainError(f"registry: {cfg.registry}: no registry.json (run `posttrain loop` first)")
        print(serve_version(cfg, Registry(cfg.registry), a.version, a.reason, override=a.override, via="cli"))
    except PosttrainError as e:
        print(f"posttrain rollback: error: {e}", file=sys.stderr)
        return 2
    return 0
