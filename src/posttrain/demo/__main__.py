"""`make demo`: LoRA SFT of the embedded SmolLM2-135M-Instruct on the sentence -> JSON record task.

1. Generate train / valid / test splits (test uses names and cities never seen in training).
2. Score the base model on the held-out test split.
3. Train a LoRA adapter with `posttrain sft examples/demo_json.yaml` (the same code path as the CLI).
4. Score the trained adapter on the same test split; print both, a few samples, and where it was saved.

Hyperparameters were chosen on the train/valid splits only; the test split is scored, never tuned on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXAMPLE_CONFIG = Path(__file__).resolve().parents[3] / "examples" / "demo_json.yaml"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _show(title: str, result: dict) -> None:
    print(f"  {title:<22} exact match {result['exact_match']:6.1%}   valid JSON {result['valid_json']:6.1%}   "
          f"field accuracy {result['field_accuracy']:6.1%}   (n={result['n']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working directory for data and the adapter")
    parser.add_argument("--train-rows", type=int, default=384)
    parser.add_argument("--test-rows", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the SFT config")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from posttrain.config import load_config
    from posttrain.demo.json_task import evaluate, make_rows
    from posttrain.errors import PosttrainError
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.stages import sft

    t0 = time.perf_counter()
    torch.manual_seed(0)
    out = Path(args.out)
    data = out / "data"
    splits = {"train": args.train_rows, "valid": 32, "test": args.test_rows}
    for split, n in splits.items():
        _write_jsonl(data / f"{split}.jsonl", make_rows(n, split, seed=1))
    print(f"[1/4] task: sentence -> JSON record; {splits['train']} train, {splits['valid']} valid and "
          f"{splits['test']} held-out test rows in {data}/ (test names and cities never appear in train)")

    try:
        tokenizer = load_tokenizer("smollm2-135m")
        test_rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
        print("[2/4] scoring the base model on the held-out split ...")
        base = evaluate(load_causal_lm("smollm2-135m"), tokenizer, test_rows)

        overrides = [f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'valid.jsonl'}",
                     f"output_dir={out / 'adapter'}", *args.overrides]
        print(f"[3/4] posttrain sft {EXAMPLE_CONFIG.relative_to(Path.cwd()) if EXAMPLE_CONFIG.is_relative_to(Path.cwd()) else EXAMPLE_CONFIG} "
              + " ".join(overrides))
        cfg = load_config("sft", EXAMPLE_CONFIG, overrides)
        result = sft.train(cfg)

        print("[4/4] scoring the trained adapter on the same held-out split ...")
        tuned = evaluate(result.model, tokenizer, test_rows)
    except PosttrainError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2

    print("\n=== held-out results (greedy decoding) ===")
    _show("base SmolLM2-135M", base)
    _show("after LoRA SFT", tuned)
    print("\nsamples (held-out):")
    for (sentence, before), (_, after) in list(zip(base["samples"], tuned["samples"]))[:3]:
        print(f"  sentence: {sentence}\n    base:  {before[:120]!r}\n    tuned: {after[:120]!r}")
    summary = {"base": {k: v for k, v in base.items() if k != "samples"},
               "tuned": {k: v for k, v in tuned.items() if k != "samples"},
               "train_steps": result.fit.steps, "train_seconds": round(result.fit.seconds, 1),
               "total_seconds": round(time.perf_counter() - t0, 1)}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nadapter saved to {result.output_dir}/ (load it with peft.PeftModel.from_pretrained, or "
          f"`posttrain generate adapter={result.output_dir} prompt=...`)")
    print(f"training took {result.fit.seconds:.0f} s for {result.fit.steps} steps; the whole demo {summary['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
