"""``posttrain loop``: adapt the served model from feedback (the cycle lives in posttrain.loop.run)."""

from __future__ import annotations

import argparse
import sys
import time

from posttrain.errors import PosttrainError

HELP = ("Adapt the served model from feedback: trigger, curate, train a candidate, gate it, "
        "promote or reject (see `posttrain loop --help`).")


def main(argv: list[str]) -> int:
    from posttrain.config import help_table
    from posttrain.feedback.store import FeedbackStore
    from posttrain.loop import run
    from posttrain.loop.registry import Registry
    from posttrain.loop.run import LoopConfig, load_loop_config, run_cycle

    p = argparse.ArgumentParser(prog="posttrain loop", description=run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="keys (key=value, dotted for sections):\n" + "\n".join(
                                    f"  {k} = {d}: {h}" for k, d, h in help_table(LoopConfig)))
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value")
    p.add_argument("--once", action="store_true", help="check the trigger once, run at most one cycle, and exit")
    a = p.parse_args(argv)
    path = a.args[0] if a.args and "=" not in a.args[0] else None
    try:
        cfg = load_loop_config(path, a.args[1:] if path else a.args)
        registry = Registry(cfg.registry)
        store = FeedbackStore(cfg.db)
        while True:
            outcome = run_cycle(cfg, registry, store)
            if outcome["event"] == "waiting":
                print(f"[loop] {outcome['new_feedback']} of {outcome['needed']} new feedback items; serving "
                      f"{registry.serving}" + ("" if a.once else f"; next check in {cfg.poll_s:.0f} s"))
            if a.once:
                return 0
            time.sleep(cfg.poll_s)
    except PosttrainError as e:
        print(f"posttrain loop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nposttrain loop: stopped", file=sys.stderr)
        return 130
