"""``posttrain data audit|clean|synth``: the curation toolkit's command line (the checks live in posttrain.curate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.errors import PosttrainError

HELP = "Data toolkit: `posttrain data audit FILE [--against EVAL] [--max-length N]` (see `posttrain data --help`)."


def main(argv: list[str]) -> int:
    """``posttrain data audit FILE [--against EVAL] [--max-length N] [--model M] [--out DIR]``."""
    from posttrain.curate import audit as audit_mod
    from posttrain.curate.audit import EMBED_MAX, SEMANTIC_THRESHOLD, audit, summary_markdown, write_reports

    parser = argparse.ArgumentParser(prog="posttrain data", description="Data toolkit: audit a dataset before training on it, clean it, or synthesise more with a teacher.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    a = sub.add_parser("audit", help="report schema errors, lengths, duplicates, PII, boilerplate, style, language, "
                       "accuracy signals, pair biases, contamination",
                       description=audit_mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("file")
    a.add_argument("--against", help="an eval set to check for contamination (word 8-gram overlap)")
    a.add_argument("--max-length", type=int, help="count rows longer than this many tokens")
    a.add_argument("--model", default="smollm2-135m", help="whose tokenizer measures lengths (default: the embedded model)")
    a.add_argument("--out", help="report folder (default: <file>.audit/)")
    a.add_argument("--embed-max", type=int, default=EMBED_MAX,
                   help=f"embed at most this many rows, a uniform sample beyond (default {EMBED_MAX})")
    a.add_argument("--no-embed", action="store_true", help="skip the embedding checks (semantic duplicates, topic clusters)")
    a.add_argument("--semantic-threshold", type=float, default=SEMANTIC_THRESHOLD,
                   help=f"cosine at which two rows are semantic duplicates (default {SEMANTIC_THRESHOLD})")
    a.add_argument("--clusters", type=int, help="topic clusters (default min(sqrt(rows/2), 20))")
    c = sub.add_parser("clean", help="write the rows worth training on, and every dropped row with its reason",
                       description=__import__("posttrain.curate.clean", fromlist=["x"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("file")
    c.add_argument("-o", "--output", required=True, help="kept rows (JSONL); rejects go to OUTPUT.rejects.jsonl")
    c.add_argument("--config", help="a YAML file of clean options (max_length, exact_dedup, near_dedup, near_threshold, "
                   "semantic_dedup, semantic_threshold, boilerplate, broken_code, invalid_json, reference_mismatch, languages, pii, model)")
    c.add_argument("--against", help="an eval set: rows holding half of an eval row's word 8-grams are dropped")
    y = sub.add_parser("synth", help="synthesise SFT rows (self-instruct) or preference pairs with a teacher model",
                       description=__import__("posttrain.curate.synth", fromlist=["x"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  posttrain data synth sft seeds=seed_tasks.jsonl num_rows=200 output=synth/sft.jsonl\n"
                              "  posttrain data synth preference prompts=prompts.jsonl 'rewards=[{function: numeric_match}]' "
                              "output=synth/prefs.jsonl\n  posttrain data synth sft synth.yaml teacher.base_url=http://localhost:8000/v1 "
                              "teacher.model=Qwen/Qwen2.5-7B-Instruct teacher.concurrency=16\n\nkeys (key=value, dotted for sections):\n"
                              + "\n".join(f"  {k} = {d}: {h}" for k, d, h in _synth_keys()))
    y.add_argument("mode", choices=["sft", "preference"])
    y.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="an optional YAML file of synth keys, then dotted overrides")
    args = parser.parse_args(argv)
    if args.command == "synth":
        return _synth_main(args.mode, args.args)
    try:
        from posttrain.models.loading import load_tokenizer

        for p in [args.file] + ([args.against] if args.against else []):
            if not Path(p).exists():
                raise PosttrainError(f"{p}: no such file")
        if args.command == "clean":
            from posttrain.curate.clean import clean, load_clean_config

            cfg = load_clean_config(args.config)
            tokenizer = load_tokenizer(cfg.model) if cfg.max_length is not None else None
            res = clean(args.file, args.output, cfg, against=args.against, tokenizer=tokenizer)
            reasons = "; ".join(f"{n} {k}" for k, n in sorted(res["reasons"].items(), key=lambda kv: -kv[1])) or "none"
            print(f"{args.file}: read {res['read']}, kept {res['kept']}, rejected {res['rejected']} "
                  f"(kept + rejected = read: checked). Reasons: {reasons}.\nkept: {res['out']}\nrejects: {res['rejects']}")
            return 0
        if args.embed_max < 1 or (args.clusters is not None and args.clusters < 1):
            raise PosttrainError("--embed-max and --clusters must be at least 1")
        if not 0.0 < args.semantic_threshold <= 1.0:
            raise PosttrainError(f"--semantic-threshold must be a cosine in (0, 1], got {args.semantic_threshold}")
        tokenizer = load_tokenizer(args.model)
        result = audit(args.file, tokenizer=tokenizer, max_length=args.max_length, against=args.against,
                       embed=not args.no_embed, embed_max=args.embed_max, semantic_threshold=args.semantic_threshold,
                       clusters=args.clusters)
        paths = write_reports(result, args.out or f"{args.file}.audit")
    except PosttrainError as e:
        print(f"posttrain data {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(summary_markdown(result.summary()))
    print(f"\nreports: {', '.join(str(p) for p in paths)}")
    return 0


def _synth_keys() -> list[tuple[str, str, str]]:
    from posttrain.config import help_table
    from posttrain.curate.synth import SynthConfig

    return [(k, d.replace("\n", " ")[:40], h) for k, d, h in help_table(SynthConfig)]


def _synth_main(mode: str, rest: list[str]) -> int:
    import sys

    from posttrain.curate.synth import format_summary, load_synth_config, run_synth
    path = rest[0] if rest and "=" not in rest[0] else None
    overrides = rest[1:] if path is not None else rest
    try:
        cfg = load_synth_config(path, overrides, mode)
        summary = run_synth(mode, cfg)
    except PosttrainError as e:
        print(f"posttrain data synth: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nposttrain data synth: interrupted; every finished item is in the journal "
              f"({cfg.output}.partial.jsonl): run the same command again to continue.", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0
