"""``posttrain pipeline``: run a recipe of stages (sft, dpo, kto, rm, grpo, ppo) with evaluations and gates."""

from __future__ import annotations

import argparse
import sys

from posttrain.errors import PosttrainError

HELP = ("Run a recipe: stages in order (sft -> dpo -> grpo ...), each from the previous one's output, evaluated "
        "and gated after each; unchanged stages are skipped on re-run (see `posttrain pipeline --help`).")

DESCRIPTION = """Run a recipe: the model, the method and stages in order (sft, dpo, kto, rm, grpo, ppo), each a stage
command's config. Every policy stage starts from the previous one's output (its adapter, or its model for full
fine-tuning) and takes it as its reference; an rm stage trains a reward model on the side, named later as
{stage:NAME}. Every stage's config is validated before the first one starts.

The base model is evaluated first and every policy stage after it trains (the evals: section: held-out tasks,
general questions, perplexity and KL to the base model on general text, a sycophancy probe); gates then decide
whether the next stage may start. A failed gate stops the run (exit status 1), keeps every output and names the
stage to revisit. Unchanged stages (same config, data and parents) are skipped on re-run; a changed stage reruns
with the stages after it. Writes report.md, report.html and report.png in output_dir. See docs/pipeline.md."""

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
    p = argparse.ArgumentParser(prog="posttrain pipeline", description=DESCRIPTION,
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
