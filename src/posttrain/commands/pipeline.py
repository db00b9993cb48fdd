"""``posttrain pipeline``: run a recipe of stages (sft, dpo, kto, rm, grpo, ppo) with evaluations and gates."""

from __future__ import annotations

import argparse
import sys

from posttrain.errors import PosttrainError

HELP = ("Run a recipe: stages in order (sft -> dpo -> grpo ...), each from the previous one's output, evaluated "
        "and gated after each; unchanged stages are skipped on re-run (see `posttrain pipeline --help`).")

EPILOG = """overrides:
  key=value           a recipe key: output_dir=runs/x, gates.max_kl=2, evals.limit=20
  STAGE.key=value     a key of one stage, by its name: dpo.beta=0.2, sft.max_steps=10

examples:
  posttrain pipeline examples/recipes/brand_voice.yaml
  posttrain pipeline examples/recipes/adaptive_assistant.yaml dpo.max_steps=40 --dry-run
"""


def main(argv: list[str]) -> int:
    from posttrain.config import help_table
    from posttrain.pipeline import run as pipeline_run
    from posttrain.pipeline.recipe import GatesConfig, RecipeConfig

    keys = "\n".join(f"  {k} = {d}: {h}" for k, d, h in help_table(RecipeConfig) if not k.startswith("gates."))
    gates = "\n".join(f"  gates.{k} = {d}: {h}" for k, d, h in help_table(GatesConfig))
    p = argparse.ArgumentParser(prog="posttrain pipeline", description=pipeline_run.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"recipe keys:\n{keys}\n{gates}\n\n{EPILOG}")
    p.add_argument("recipe", metavar="RECIPE.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--dry-run", action="store_true", help="validate every stage's config and print the plan (which stages would run) without training")
    a = p.parse_args(argv)
    try:
        from posttrain.pipeline.recipe import load_plan

        plan = load_plan(a.recipe, a.overrides)
        if a.dry_run:
            print(pipeline_run.describe(plan))
            return 0
        result = pipeline_run.run(plan)
    except pipeline_run.StageFailed as e:
        print(f"posttrain pipeline: {e}", file=sys.stderr)
        return e.code if e.code > 0 else 1
    except PosttrainError as e:
        print(f"posttrain pipeline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nposttrain pipeline: interrupted", file=sys.stderr)
        return 130
    return 0 if result.ok else 1
