"""``posttrain feedback export``: the feedback store's command line (the export lives in posttrain.feedback.export)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.errors import PosttrainError

HELP = ("Feedback store: `posttrain feedback export --db URL --format kto|dpo|sft -o OUT` "
        "(see `posttrain feedback export --help`).")


def main(argv: list[str]) -> int:
    """``posttrain feedback export ...``; see posttrain.feedback.export."""
    from sqlalchemy.engine import make_url

    from posttrain.curate.clean import load_clean_config
    from posttrain.feedback import export
    from posttrain.feedback.export import FORMATS, NEGATIVE_MAX_RATING, export_feedback
    from posttrain.feedback.store import FeedbackStore

    parser = argparse.ArgumentParser(prog="posttrain feedback",
                                     description="Feedback captured by `posttrain serve`: export it as training data.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    e = sub.add_parser("export", help="write KTO, DPO or SFT rows from stored feedback, deduplicated and PII-redacted",
                       description=export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--db", required=True, help="the store: sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB")
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("-o", "--output", required=True, help="kept rows (JSONL); also writes OUTPUT.raw.jsonl and "
                   "OUTPUT.rejects.jsonl")
    e.add_argument("--since", type=int, default=0, metavar="ID", help="only feedback with id > ID (default 0: all)")
    e.add_argument("--min-rating", type=int, default=4, metavar="N",
                   help=f"ratings of N or more are positive (default 4); {NEGATIVE_MAX_RATING} or less are negative")
    e.add_argument("--include-positive", action="store_true",
                   help="sft: also train on responses judged positive (thumbs up, rating >= --min-rating)")
    e.add_argument("--clean-config", metavar="YAML", help="options of `posttrain data clean` (default: exact and "
                   "near dedup, PII redaction, content filters where every response is a target)")
    args = parser.parse_args(argv)
    try:
        cfg = load_clean_config(args.clean_config)
        url = make_url(args.db) if "://" in args.db else None
        if url is not None and url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
            raise PosttrainError(f"--db: {url.database}: no such file (the store `posttrain serve` writes)")
        with FeedbackStore(args.db) as store:
            result = export_feedback(store, args.format, args.output, since_id=args.since,
                                     min_rating=args.min_rating, include_positive=args.include_positive,
                                     clean_config=cfg)
    except (PosttrainError, ValueError) as e:
        print(f"posttrain feedback {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.db}: {result.summary()}")
    return 0
