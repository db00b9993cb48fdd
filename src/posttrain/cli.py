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

from posttrain.config import STAGE_CONFIGS, help_table, load_config
from posttrain.errors import PosttrainError

DESCRIPTIONS = {
    "sft": "Supervised fine-tuning on messages / prompt+completion / text data.",
    "rm": "Train a Bradley-Terry reward model on prompt/chosen/rejected pairs.",
    "dpo": "Preference optimisation on prompt/chosen/rejected pairs: DPO, robust DPO, IPO, hinge, SimPO.",
    "kto": "KTO on unpaired prompt/completion/label (thumbs up/down) data.",
    "grpo": "Online RL with GRPO/RLOO: sample groups of completions per prompt, reward them, guard against reward hacking.",
    "ppo": "Online RL with PPO: a value head on the policy, GAE, a KL penalty; typically with a reward model.",
    "score": "Score prompt/response pairs with a reward model from `posttrain rm`.",
    "generate": "Generate answers for prompts with a model and an optional adapter.",
    "chat": "Chat interactively with a model and an optional adapter (/reset, /exit).",
    "merge": "Merge a LoRA/DoRA adapter into its base model and save a full transformers model.",
    "eval": "Eval loss and perplexity on a dataset, plus sample generations.",
    "plan": "Predict peak memory and FLOPs per method; recommend the cheapest method that fits.",
    "serve": "Serve the model and its LoRA adapters over an OpenAI-compatible HTTP API, logging completions and feedback.",
}

EXAMPLES = {
    "sft": "posttrain sft examples/sft_lora.yaml\n  posttrain sft data.train=train.jsonl method=qlora lora.r=32 max_steps=200",
    "rm": "posttrain rm examples/rm.yaml\n  posttrain rm data.train=prefs.jsonl method=lora max_steps=200",
    "dpo": "posttrain dpo examples/dpo.yaml\n  posttrain dpo data.train=prefs.jsonl adapter=runs/sft loss=ipo beta=0.5",
    "kto": "posttrain kto examples/kto.yaml\n  posttrain kto data.train=feedback.jsonl undesirable_weight=1.3",
    "grpo": "posttrain grpo examples/demo_grpo.yaml data.train=runs/demo/arith/train.jsonl\n  posttrain grpo data.train=prompts.jsonl 'rewards=[{function: numeric_match}]' num_generations=8",
    "ppo": "posttrain ppo examples/demo_ppo.yaml data.train=runs/demo/arith/train.jsonl\n  posttrain ppo data.train=prompts.jsonl 'rewards=[{reward_model: runs/rm}]'",
    "score": "posttrain score reward_model=runs/rm data=prefs.jsonl\n  posttrain score reward_model=runs/rm prompt='Hi' response='[\"Hello!\", \"Go away.\"]'",
    "generate": "posttrain generate adapter=runs/sft prompt='[\"Name three colours.\"]'",
    "chat": "posttrain chat adapter=runs/sft",
    "merge": "posttrain merge adapter=runs/sft output_dir=runs/sft-merged",
    "eval": "posttrain eval adapter=runs/sft data=heldout.jsonl",
    "plan": "posttrain plan model=7b device_memory_gb=24\n  posttrain plan table=true batch_size=1",
    "serve": "POSTTRAIN_API_KEY=secret posttrain serve 'adapters={assistant: runs/dpo}'\n"
             "  POSTTRAIN_API_KEY=secret POSTTRAIN_ADMIN_KEY=other posttrain serve registry=runs/loop   # the loop's gated versions\n"
             "  posttrain serve --no-auth port=8080",
}


def _keys_help(stage: str) -> str:
    rows = help_table(STAGE_CONFIGS[stage])
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
    sub.add_parser("data", help="Data toolkit: `posttrain data audit FILE [--against EVAL] [--max-length N]` (see `posttrain data --help`).")
    sub.add_parser("feedback", help="Feedback store: `posttrain feedback export --db URL --format kto|dpo|sft -o OUT` "
                   "(see `posttrain feedback export --help`).")
    sub.add_parser("loop", help="Adapt the served model from feedback: trigger, curate, train a candidate, gate it, "
                   "promote or reject (see `posttrain loop --help`).")
    sub.add_parser("rollback", help="Serve an earlier registry version again: `posttrain rollback VERSION [CONFIG]`.")
    for stage, desc in DESCRIPTIONS.items():
        p = sub.add_parser(
            stage,
            help=desc,
            description=f"{desc}\n\nUsage: posttrain {stage} [CONFIG.yaml] [key=value ...]\n"
            "Dotted keys override the YAML file; values are YAML scalars or lists.",
            epilog=f"keys:\n{_keys_help(stage)}\n\nexamples:\n  {EXAMPLES[stage]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
        if stage == "serve":
            p.add_argument("--no-auth", action="store_true", help="Turn API-key auth off (auth=false), for local use only.")
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


def run(stage: str, cfg) -> None:
    if stage in ("sft", "rm", "dpo", "kto", "grpo", "ppo"):
        import importlib

        importlib.import_module(f"posttrain.stages.{stage}").train(cfg)
    elif stage == "plan":
        from posttrain.plan import run_plan

        run_plan(cfg)
    elif stage == "serve":
        from posttrain.serve import run_serve

        run_serve(cfg)
    else:
        from posttrain import commands

        getattr(commands, f"run_{stage}")(cfg)


def quiet_known_warnings() -> None:
    """Silence library deprecation notices a user cannot act on (PEFT reads a transformers property that
    transformers deprecated); posttrain's own messages are unaffected."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_warnings()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":  # the data toolkit has its own subcommands and flags
        from posttrain.data.audit import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "feedback":  # so has the feedback store's export
        from posttrain.feedback.export import main as feedback_main

        return feedback_main(argv[1:])
    if argv and argv[0] in ("loop", "rollback"):  # the feedback loop: its own config and flags
        from posttrain.loop.run import main_loop, main_rollback

        return (main_loop if argv[0] == "loop" else main_rollback)(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.stage is None:
        parser.print_help()
        return 2
    try:
        config_path, overrides = _split_args(ns.args)
        if ns.stage == "serve" and ns.no_auth:
            overrides.append("auth=false")
        cfg = load_config(ns.stage, config_path, overrides)
        run(ns.stage, cfg)
    except PosttrainError as e:
        print(f"posttrain {ns.stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
