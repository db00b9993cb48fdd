"""``posttrain compare``: one SFT config under several methods, measured side by side with the plan's predictions."""

from __future__ import annotations

import argparse
import sys

from posttrain.errors import PosttrainError

HELP = ("Train one SFT config under several methods (full, lora, qlora, prompt, prefix) and print the measured "
        "trade-off table (time, memory, parameters, size, task and forgetting metrics) next to the plan's predictions.")

EPILOG = """keys (besides every `posttrain sft` key):
  methods=[full,lora,qlora,prompt,prefix]   the methods to compare (each from the base model)
  method_overrides={full: {lr: 2e-5}}       keys one method gets on top of the shared config
  output_dir=runs/compare                   one sub-folder per method, and compare.md/.json/.png
  evals.*                                   as a recipe's evals section (`posttrain pipeline --help`); default: the
                                            eval loss on data.eval (when set), the built-in general questions,
                                            general text (perplexity, KL to the base model) and sycophancy probe

examples:
  posttrain compare examples/compare/json_records.yaml
  posttrain compare examples/sft_lora.yaml data.train=examples/recipes/data/json_train.jsonl max_steps=20
  posttrain compare examples/sft_lora.yaml methods=[lora,qlora] evals.limit=20
"""


def main(argv: list[str]) -> int:
    from posttrain.pipeline import compare

    p = argparse.ArgumentParser(prog="posttrain compare", description=compare.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("args", nargs="*", metavar="[SFT_CONFIG.yaml] key=value")
    a = p.parse_args(argv)
    path = a.args[0] if a.args and "=" not in a.args[0] else None
    try:
        spec = compare.load_spec(path, a.args[1:] if path else a.args)
        compare.run(spec)
    except PosttrainError as e:
        print(f"posttrain compare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nposttrain compare: interrupted", file=sys.stderr)
        return 130
    return 0
