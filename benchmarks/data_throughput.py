"""Rows/s and peak memory of `posttrain data audit`-style dedup and of `posttrain data clean` on a generated file.

    python benchmarks/data_throughput.py --rows 1000000 --out benchmarks/results/cpu-2026-11-27/data.json

Generates ``--rows`` SFT rows (``messages``: a templated question and an 80-word answer drawn from a vocabulary, so
rows are distinct) with planted exact duplicates (1%) and near duplicates (1%, one word changed), then times, each in
its own subprocess so peak RSS is per part:

- ``dedup``: exact (normalised BLAKE2b digests) + MinHash-LSH near duplicates over every row, the issue's target
  (1M rows in under 10 minutes on 2 cores, peak RSS under 4 GB);
- ``clean``: the whole ``posttrain data clean`` pipeline with default options but no tokenizer length filter.

Reports rows/s, seconds, peak RSS and how many planted duplicates were found: ``near_recall`` is the share of
planted near copies (those whose changed word differs from the original) reported as near duplicates, and
``near_unplanted`` counts rows reported as near duplicates that were not planted (false positives: the fresh rows
are random, so any two share almost no 5-gram). The planted line numbers are written next to the generated file
(``rows-N.planted.json``). Run it ALONE on the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("river stone light cloud market garden letter window engine harbor signal forest silver paper winter "
         "orange basket mirror ladder candle bridge castle pocket rocket planet velvet button copper meadow "
         "thunder lantern compass anchor violin marble feather blanket pepper island canyon").split()


def generate(path: Path, rows: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    planted_exact = planted_near = 0
    near_lines: list[int] = []  # 1-based lines of near copies whose text differs from the original's
    recent: list[dict] = []
    with path.open("w") as f:
        for i in range(rows):
            r = rng.random()
            if recent and r < 0.01:
                row = rng.choice(recent)
                planted_exact += 1
            elif recent and r < 0.02:
                base = rng.choice(recent)
                words = base["messages"][1]["content"].split()
                words[rng.randrange(len(words))] = rng.choice(WORDS)
                row = {"messages": [base["messages"][0], {"role": "assistant", "content": " ".join(words)}]}
                planted_near += 1
                if row != base:
                    near_lines.append(i + 1)
            else:
                answer = " ".join(rng.choice(WORDS) for _ in range(80))
                row = {"messages": [{"role": "user", "content": f"Question {i}: describe item {rng.randrange(10**9)}."},
                                    {"role": "assistant", "content": answer}]}
                recent = (recent + [row])[-1000:]
            f.write(json.dumps(row) + "\n")
    _planted_path(path).write_text(json.dumps({"near_lines": near_lines}))
    return {"rows": rows, "planted_exact": planted_exact, "planted_near": planted_near,
            "planted_near_changed": len(near_lines)}


def _planted_path(path: Path) -> Path:
    return path.with_name(path.stem + ".planted.json")


def run_dedup(path: Path) -> dict:
    import hashlib

    from posttrain.curate.dedup import NearDuplicateIndex, normalize_for_dedup
    from posttrain.curate.rows import parse_row
    from posttrain.data.io import read_records

    t0 = time.perf_counter()
    seen: set[bytes] = set()
    index = NearDuplicateIndex()
    exact = n = 0
    near_lines: list[int] = []
    for record in read_records(path):
        n += 1  # the file has no blank lines, so n is also the line number
        norm = normalize_for_dedup(parse_row(record.where, record.data).text)
        digest = hashlib.blake2b(norm.encode(), digest_size=16).digest()
        if digest in seen:
            exact += 1
            continue
        seen.add(digest)
        if index.add(n, norm):
            near_lines.append(n)
    seconds = time.perf_counter() - t0
    planted = set(json.loads(_planted_path(path).read_text())["near_lines"])
    found = len(planted.intersection(near_lines))
    return {"rows": n, "seconds": seconds, "exact_found": exact, "near_found": len(near_lines),
            "near_recall": found / max(len(planted), 1), "near_unplanted": len(near_lines) - found}


def run_clean(path: Path, out: Path) -> dict:
    from posttrain.curate.clean import CleanConfig, clean

    t0 = time.perf_counter()
    res = clean(path, out, CleanConfig())
    return {"rows": res["read"], "seconds": time.perf_counter() - t0, "kept": res["kept"], "reasons": res["reasons"]}


def child(part: str, path: str, out: str) -> None:
    res = run_dedup(Path(path)) if part == "dedup" else run_clean(Path(path), Path(out))
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--parts", default="dedup,clean")
    p.add_argument("--work", default="/tmp/posttrain-data-bench", help="where the generated file goes")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"rows-{args.rows}.jsonl"
    t0 = time.perf_counter()
    planted = generate(data, args.rows)
    print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.0f} s: {planted}", flush=True)
    results = {"planted": planted, "file_mb": data.stat().st_size / 2**20}
    for part in args.parts.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", part, str(data), str(work / "clean.jsonl")],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        res = json.loads(line[7:])
        res["rows_per_s"] = res["rows"] / res["seconds"]
        results[part] = res
        print(f"[{part}] {res['rows']:,} rows in {res['seconds']:.0f} s = {res['rows_per_s']:,.0f} rows/s, "
              f"peak RSS {res['peak_rss_mb']:,.0f} MB; " + json.dumps({k: v for k, v in res.items() if k not in ('rows', 'seconds', 'rows_per_s', 'peak_rss_mb')}), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
