"""`make demo`: post-train the embedded SmolLM2-135M-Instruct in four stages, each scored on held-out data.

Every stage's training file first goes through `posttrain data audit` (report path printed) and `posttrain
data clean`, both checked against the stage's held-out split for contamination; the stage trains on the
cleaned file.

sft  LoRA SFT on the sentence -> JSON record task (`posttrain sft examples/demo_json.yaml`):
     1. generate train / valid / test splits (test uses names and cities never seen in training);
     2. score the base model on the test split; 3. train; 4. score the trained adapter.
dpo  DPO from the SFT adapter (`posttrain dpo examples/demo_dpo.yaml adapter=<out>/adapter`) on a built-in
     preference set, "concise answers": short factual questions, the chosen answer one short sentence, the
     rejected one the same fact buried in filler. A code check judges greedy answers to held-out questions
     (the correct fact in <= 12 words) with the SFT adapter and after DPO; the DPO implicit reward's accuracy
     on the held-out pairs is printed too.
rm   a LoRA Bradley-Terry reward model on the base model (`posttrain rm examples/demo_rm.yaml`), trained on
     the same pairs; its pairwise accuracy on the held-out pairs, and (after dpo) its scores of the greedy
     answers from before and after DPO.

rl   online RL with GRPO (`posttrain grpo examples/demo_grpo.yaml`) from the base model on built-in arithmetic
     word problems, rewarded by the shipped numeric_match verifier; greedy held-out accuracy before and after.

`--stages` runs a subset (default all four, in that order); dpo needs the SFT adapter in the same --out.
Hyperparameters were chosen on the train/valid splits only; the test splits are scored, never tuned on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
EXAMPLE_CONFIG = EXAMPLES / "demo_json.yaml"
DPO_CONFIG = EXAMPLES / "demo_dpo.yaml"
RM_CONFIG = EXAMPLES / "demo_rm.yaml"
GRPO_CONFIG = EXAMPLES / "demo_grpo.yaml"
STAGES = ("sft", "dpo", "rm", "rl")
MODEL = "smollm2-135m"
DETAIL = ("samples", "completions", "passed")  # per-row results of concise_task.evaluate, kept out of the summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _shown(path: Path) -> Path:
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def _show(title: str, result: dict) -> None:
    print(f"  {title:<22} exact match {result['exact_match']:6.1%}   valid JSON {result['valid_json']:6.1%}   "
          f"field accuracy {result['field_accuracy']:6.1%}   (n={result['n']})")


def _show_concise(title: str, result: dict) -> None:
    print(f"  {title:<26} check passed {result['pass_rate']:6.1%}   correct fact {result['states_fact']:6.1%}   "
          f"<= 12 words {result['concise']:6.1%}   mean words {result['mean_words']:5.1f}   (n={result['n']})")


def _stages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(STAGES)}, got '{text}'")
    return [s for s in STAGES if s in names]


def curate(train: Path, against: Path, tokenizer) -> Path:
    """The data-first step of every stage: `posttrain data audit` and `posttrain data clean` on its training file
    (checked against its held-out split for contamination); the stage then trains on the cleaned file."""
    from posttrain.curate.audit import audit, write_reports
    from posttrain.curate.clean import CleanConfig, clean

    result = audit(train, tokenizer=tokenizer, against=against, progress=False)
    report, _, _ = write_reports(result, train.with_name(train.name + ".audit"))
    s = result.summary()
    print(f"[data] posttrain data audit {_shown(train)} --against {_shown(against)}: {s['rows']} rows, {s['invalid']} invalid, "
          f"{s['exact_duplicates']} exact / {s['near_duplicates']} near / {s['semantic_duplicates']['pairs']} semantic duplicates (reported only), "
          f"{sum(s['pii'].values())} with PII, {s['contamination']['rows']} contaminated; report {_shown(report)}")
    cleaned = train.with_name(train.stem + ".clean.jsonl")
    res = clean(train, cleaned, CleanConfig(), against=against, progress=False)
    reasons = ", ".join(f"{n} {k}" for k, n in res["reasons"].items()) or "none"
    print(f"[data] posttrain data clean {_shown(train)} -o {_shown(cleaned)}: kept {res['kept']} of {res['read']} "
          f"(dropped or changed: {reasons}); rejects in {_shown(Path(res['rejects']))}")
    return cleaned


def run_sft(args, out: Path, tokenizer) -> dict:
    """The JSON-record SFT stage (steps 1-4); returns its summary."""
    from posttrain.commands import load_config
    from posttrain.demo.json_task import evaluate, make_rows
    from posttrain.models.loading import load_causal_lm
    from posttrain.stages import sft

    data = out / "data"
    splits = {"train": args.train_rows, "valid": 32, "test": args.test_rows}
    for split, n in splits.items():
        _write_jsonl(data / f"{split}.jsonl", make_rows(n, split, seed=1))
    print(f"[1/4] task: sentence -> JSON record; {splits['train']} train, {splits['valid']} valid and "
          f"{splits['test']} held-out test rows in {data}/ (test names and cities never appear in train)")

    train = curate(data / "train.jsonl", data / "test.jsonl", tokenizer)

    test_rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    print("[2/4] scoring the base model on the held-out split ...")
    base = evaluate(load_causal_lm(MODEL), tokenizer, test_rows)

    overrides = [f"data.train={train}", f"data.eval={data / 'valid.jsonl'}",
                 f"output_dir={out / 'adapter'}", *args.overrides]
    print(f"[3/4] posttrain sft {_shown(EXAMPLE_CONFIG)} " + " ".join(overrides))
    result = sft.train(load_config("sft", EXAMPLE_CONFIG, overrides))

    print("[4/4] scoring the trained adapter on the same held-out split ...")
    tuned = evaluate(result.model, tokenizer, test_rows)

    print("\n=== held-out results (greedy decoding) ===")
    _show("base SmolLM2-135M", base)
    _show("after LoRA SFT", tuned)
    print("\nsamples (held-out):")
    for (sentence, before), (_, after) in list(zip(base["samples"], tuned["samples"]))[:3]:
        print(f"  sentence: {sentence}\n    base:  {before[:120]!r}\n    tuned: {after[:120]!r}")
    print(f"\nadapter saved to {result.output_dir}/ (load it with peft.PeftModel.from_pretrained, or "
          f"`posttrain generate adapter={result.output_dir} prompt=...`)")
    print(f"training took {result.fit.seconds:.0f} s for {result.fit.steps} steps")
    return {"base": {k: v for k, v in base.items() if k != "samples"},
            "tuned": {k: v for k, v in tuned.items() if k != "samples"},
            "train_steps": result.fit.steps, "train_seconds": round(result.fit.seconds, 1)}


def preference_data(args, out: Path, tokenizer) -> tuple[Path, list[dict]]:
    """Write the concise-answers pairs (train / valid / test) once per run; returns the folder and the test rows."""
    from posttrain.demo.concise_task import make_pairs

    data = out / "prefs"
    splits = {"train": args.pref_train_rows, "valid": 30, "test": args.pref_test_rows}
    for split, n in splits.items():
        _write_jsonl(data / f"{split}.jsonl", make_pairs(n, split, seed=1))
    print(f"[prefs] task: concise answers to short factual questions (capitals and sums); {splits['train']} train, "
          f"{splits['valid']} valid and {splits['test']} held-out test pairs in {data}/ (test facts never appear in train)")
    curate(data / "train.jsonl", data / "test.jsonl", tokenizer)  # dpo and rm train on train.clean.jsonl
    return data, make_pairs(splits["test"], "test", seed=1)


def run_dpo(args, out: Path, tokenizer, data: Path, test_rows: list[dict]) -> tuple[dict, object]:
    """SFT adapter -> DPO; greedy answers to the held-out questions judged by the check before and after."""
    from posttrain.commands import load_config
    from posttrain.demo.concise_task import MAX_WORDS, evaluate, question_of
    from posttrain.errors import PosttrainError
    from posttrain.models.adapters import load_for_inference
    from posttrain.stages import dpo

    adapter = out / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise PosttrainError(f"the dpo stage starts from the SFT adapter, and {adapter}/ has none: "
                             "run the sft stage first (--stages sft,dpo) with the same --out")
    print(f"[dpo 1/3] scoring the SFT adapter on the held-out questions (check: the correct fact in <= {MAX_WORDS} words) ...")
    before = evaluate(load_for_inference(MODEL, str(adapter)), tokenizer, test_rows)

    overrides = [f"adapter={adapter}", f"data.train={data / 'train.clean.jsonl'}", f"data.eval={data / 'test.jsonl'}",
                 f"output_dir={out / 'dpo'}", *args.dpo]
    print(f"[dpo 2/3] posttrain dpo {_shown(DPO_CONFIG)} " + " ".join(overrides))
    result = dpo.train(load_config("dpo", DPO_CONFIG, overrides))

    print("[dpo 3/3] scoring the DPO adapter on the same held-out questions ...")
    after = evaluate(result.model, tokenizer, test_rows)
    ev = result.fit.eval_metrics
    summary = {"before": {k: v for k, v in before.items() if k not in DETAIL},
               "after": {k: v for k, v in after.items() if k not in DETAIL},
               "heldout_pairs": {k: ev[k] for k in ("rewards/accuracy", "rewards/margins", "loss") if k in ev},
               "train_steps": result.fit.steps, "train_seconds": round(result.fit.seconds, 1),
               "answers": [{"question": question_of(row), "before": b, "passed_before": bp, "after": a, "passed_after": ap}
                           for row, b, bp, a, ap in zip(test_rows, before["completions"], before["passed"],
                                                        after["completions"], after["passed"], strict=True)]}
    return summary, (before, after, result)


def show_dpo(summary: dict, detail) -> None:
    before, after, result = detail
    pairs = summary["heldout_pairs"]
    print("\n=== preference stage: concise answers, held-out questions (greedy decoding) ===")
    _show_concise("SFT adapter (before DPO)", before)
    _show_concise("after DPO", after)
    print(f"  DPO implicit reward on the {int(result.fit.eval_metrics.get('units', 0))} held-out pairs: accuracy "
          f"{pairs['rewards/accuracy']:.1%}, mean margin {pairs['rewards/margins']:.2f} "
          "(before DPO every implicit reward is 0: the policy is the reference)")
    print("\nsamples (held-out):")
    for (question, b, b_ok), (_, a, a_ok) in list(zip(before["samples"], after["samples"]))[:3]:
        print(f"  question: {question}\n    before: {b[:120]!r} [{'pass' if b_ok else 'fail'}]\n"
              f"    after:  {a[:120]!r} [{'pass' if a_ok else 'fail'}]")
    print(f"\nDPO adapter saved to {result.output_dir}/; training took {result.fit.seconds:.0f} s for {result.fit.steps} steps")


def run_rm(args, out: Path, data: Path, test_rows: list[dict], dpo_detail) -> dict:
    """A LoRA reward model on the base model, scored on the held-out pairs (and on the DPO stage's answers)."""
    from posttrain.commands import load_config
    from posttrain.data.formats import normalize_prompt_completion
    from posttrain.rewards.model import load_reward_model
    from posttrain.stages import rm

    overrides = [f"data.train={data / 'train.clean.jsonl'}", f"data.eval={data / 'test.jsonl'}",
                 f"output_dir={out / 'rm'}", *args.rm]
    steps = 2 if dpo_detail is not None else 1
    print(f"[rm 1/{steps}] posttrain rm {_shown(RM_CONFIG)} " + " ".join(overrides))
    result = rm.train(load_config("rm", RM_CONFIG, overrides))
    ev = result.fit.eval_metrics
    summary = {"heldout_pairs": {k: ev[k] for k in ("accuracy", "margin", "loss") if k in ev}, "n": int(ev.get("units", 0)),
               "train_steps": result.fit.steps, "train_seconds": round(result.fit.seconds, 1)}
    greedy = None
    if dpo_detail is not None:
        print("[rm 2/2] scoring the dpo stage's held-out answers with the saved reward model ...")
        before, after, _ = dpo_detail
        examples = [normalize_prompt_completion(row["prompt"], [{"role": "assistant", "content": text or "."}])
                    for texts in (before["completions"], after["completions"]) for row, text in zip(test_rows, texts, strict=True)]
        scores = load_reward_model(result.output_dir).score_examples(examples)
        n = len(test_rows)
        b_scores, a_scores = scores[:n], scores[n:]
        greedy = {"mean_before_dpo": sum(b_scores) / n, "mean_after_dpo": sum(a_scores) / n,
                  "after_above_before": sum(a > b for a, b in zip(a_scores, b_scores)) / n,
                  "rank_agrees_with_check": _agreement(b_scores + a_scores, before["passed"] + after["passed"])}
        summary["greedy_answers"] = greedy

    print("\n=== reward model (LoRA on the base model), held-out pairs ===")
    print(f"  pairwise accuracy {ev['accuracy']:.1%} (chosen scored above rejected, n={summary['n']}); "
          f"mean margin {ev['margin']:.2f}")
    if greedy is not None:
        print(f"  mean score of the greedy answers to the held-out questions: {greedy['mean_before_dpo']:.2f} with the "
              f"SFT adapter, {greedy['mean_after_dpo']:.2f} after DPO (after > before on {greedy['after_above_before']:.0%} "
              "of questions)")
        print(f"  of (passing, failing) answer pairs, the reward model scores the passing one higher in "
              f"{greedy['rank_agrees_with_check']:.0%} (chance: 50%)")
    print(f"\nreward model saved to {result.output_dir}/ (`posttrain score reward_model={result.output_dir} ...`); "
          f"training took {result.fit.seconds:.0f} s for {result.fit.steps} steps")
    return summary


def _agreement(scores: list[float], passed: list[bool]) -> float:
    """Over every (passing answer, failing answer) pair, the share where the passing one scores higher."""
    good = [s for s, p in zip(scores, passed, strict=True) if p]
    bad = [s for s, p in zip(scores, passed, strict=True) if not p]
    pairs = [(g, b) for g in good for b in bad]
    return sum(g > b for g, b in pairs) / len(pairs) if pairs else float("nan")


def run_rl(args, out: Path) -> dict:
    """GRPO on the arithmetic task; held-out reward (= accuracy: the verifier scores 0 or 1) before and after."""
    from posttrain.commands import load_config
    from posttrain.demo.arith_task import make_rows
    from posttrain.stages import grpo

    data = out / "arith"
    _write_jsonl(data / "train.jsonl", make_rows(args.rl_train_rows, "train", seed=0))
    _write_jsonl(data / "test.jsonl", make_rows(args.rl_test_rows, "test", seed=0))
    print(f"[rl 1/2] task: one-step arithmetic word problems; {args.rl_train_rows} train and {args.rl_test_rows} held-out "
          f"prompts in {data}/ (held-out names, objects and number pairs never appear in train); reward: numeric_match")
    overrides = [f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'test.jsonl'}", f"output_dir={out / 'grpo'}", *args.grpo]
    print(f"[rl 2/2] posttrain grpo {_shown(GRPO_CONFIG)} " + " ".join(overrides))
    result = grpo.train(load_config("grpo", GRPO_CONFIG, overrides))
    history = result.fit.history
    before = history[0].get("heldout/reward/numeric_match", float("nan"))  # step 1's rollout policy = the base model
    after = result.fit.eval_metrics.get("reward/numeric_match", float("nan"))
    print("\n=== rl stage: arithmetic word problems, held-out accuracy (greedy decoding) ===")
    print(f"  base model      {before:6.1%}   mean length {history[0].get('heldout/length', float('nan')):5.1f} tokens")
    print(f"  after GRPO      {after:6.1%}   mean length {result.fit.eval_metrics.get('length', float('nan')):5.1f} tokens "
          f"({result.fit.steps} steps, {result.fit.seconds:.0f} s; rollout {history[-1].get('rollout/tokens_per_s', 0):.0f} tok/s, "
          f"{history[-1].get('rollout/share', 0):.0%} of the step)")
    print(f"  train reward    step 1 {history[0]['reward']:.3f} -> step {len(history)} {history[-1]['reward']:.3f}; "
          f"KL to the base model {history[-1]['kl']:.4f}; report: {result.report}")
    return {"heldout_accuracy_before": before, "heldout_accuracy_after": after, "steps": result.fit.steps,
            "train_seconds": round(result.fit.seconds, 1), "stopped": result.stopped,
            "train_reward": [round(h["reward"], 4) for h in history]}


def main(argv: list[str] | None = None) -> int:
    from posttrain.cli import quiet_known_warnings

    quiet_known_warnings()
    parser = argparse.ArgumentParser(prog="python -m posttrain.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working directory for data, adapters and the reward model")
    parser.add_argument("--stages", type=_stages, default=list(STAGES),
                        help="comma-separated stages to run, of sft,dpo,rm,rl (default: all); dpo needs sft's adapter in --out")
    parser.add_argument("--train-rows", type=int, default=384)
    parser.add_argument("--test-rows", type=int, default=64)
    parser.add_argument("--pref-train-rows", type=int, default=192, help="preference pairs to train DPO and the reward model on")
    parser.add_argument("--pref-test-rows", type=int, default=32, help="held-out preference pairs (and questions)")
    parser.add_argument("--dpo", action="append", default=[], metavar="KEY=VALUE", help="an override for the DPO config (repeatable)")
    parser.add_argument("--rm", action="append", default=[], metavar="KEY=VALUE", help="an override for the reward-model config (repeatable)")
    parser.add_argument("--grpo", action="append", default=[], metavar="KEY=VALUE", help="an override for the GRPO config (repeatable)")
    parser.add_argument("--rl-train-rows", type=int, default=256, help="arithmetic prompts to train GRPO on")
    parser.add_argument("--rl-test-rows", type=int, default=32, help="held-out arithmetic prompts")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the SFT config")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from posttrain.errors import PosttrainError
    from posttrain.models.loading import load_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    out = Path(args.out)
    results_path = out / "demo_results.json"
    summary: dict = json.loads(results_path.read_text()) if results_path.is_file() else {}
    seconds: dict[str, float] = {}
    try:
        tokenizer = load_tokenizer(MODEL)
        if "sft" in args.stages:
            t = time.perf_counter()
            summary.update(run_sft(args, out, tokenizer))
            seconds["sft"] = time.perf_counter() - t
        if "dpo" in args.stages or "rm" in args.stages:
            print()
            data, test_rows = preference_data(args, out, tokenizer)
        dpo_detail = None
        if "dpo" in args.stages:
            t = time.perf_counter()
            summary["dpo"], dpo_detail = run_dpo(args, out, tokenizer, data, test_rows)
            seconds["dpo"] = time.perf_counter() - t
            show_dpo(summary["dpo"], dpo_detail)
        if "rm" in args.stages:
            t = time.perf_counter()
            summary["rm"] = run_rm(args, out, data, test_rows, dpo_detail)
            seconds["rm"] = time.perf_counter() - t
        if "rl" in args.stages:
            print()
            t = time.perf_counter()
            summary["rl"] = run_rl(args, out)
            seconds["rl"] = time.perf_counter() - t
    except PosttrainError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2

    summary["stage_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(summary, indent=2))
    print("\n" + "; ".join(f"{k} stage {v:.0f} s" for k, v in seconds.items())
          + f"; the whole demo {summary['total_seconds']:.0f} s (results in {results_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
