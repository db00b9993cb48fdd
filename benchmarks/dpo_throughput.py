"""Preference-training throughput: posttrain's DPO, KTO and reward model against TRL's ``DPOTrainer``,
``KTOTrainer`` and ``RewardTrainer``, side by side in one run.

    python benchmarks/dpo_throughput.py                                  # DPO, KTO, RM; posttrain, TRL default and best
    python benchmarks/dpo_throughput.py --stages dpo --tools posttrain,trl-fast --steps 4
    python benchmarks/dpo_throughput.py --parts parity                   # only the first-step equality check
    POSTTRAIN_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/dpo_throughput.py  # AVX2 path

Run it ALONE: the numbers are wall times on a shared 2-core machine; the ratios are the headline.

Every run trains SmolLM2-135M-Instruct with the same LoRA (r 16 on all linear layers, alpha 32, dropout 0), batch 8
(pairs for DPO and RM, completions for KTO), max_length 512, constant learning rate, no warmup, no weight decay,
clipping at 1.0, beta 0.1, the reference = the base model (the adapter disabled), computed online every step by
both tools. The data are preference pairs built from :func:`sft_throughput.make_conversations` (the SFT
benchmark's chat rows, median ~210 tokens): the prompt is the conversation up to its last answer, ``chosen`` that
answer, ``rejected`` the same answer with its lines shuffled and one line altered (a wrong answer of the same
length). KTO gets each pair as two completions, ``label`` true and false. Each run is its own subprocess.

Setups (``--tools``):

- ``posttrain``: its defaults (``precision=auto``: bf16 on CPUs with native bf16, else fp32; packing; no
  gradient checkpointing), through the public API (``posttrain.stages.<stage>.train``);
- ``trl-default``: TRL's config at its defaults but for the shared settings above: gradient checkpointing on,
  ``bf16`` left to TRL, no padding-free batches;
- ``trl-fast``: gradient checkpointing off, and the precision that is faster on this CPU (``--trl-bf16 auto``:
  bf16 where the measured bf16 matmul beats fp32, else fp32);
- ``trl-padding-free`` (DPO only): ``trl-fast`` plus ``padding_free=True``. On a CPU (no FlashAttention) it was
  slower than ``trl-fast`` and took 3x its memory (2026-12-06), so it is not in the default ``--tools``.

The table marks TRL's fastest measured setup per stage; posttrain's speed-up target is against that one.

Measured per optimizer step after ``--warmup`` steps: wall seconds (posttrain's ``train/step_seconds``; TRL's
time between ``on_step_end`` callbacks, data loading included in both), examples per second (8 / seconds), and
peak RSS of the subprocess (model loading included). ``--parts parity`` trains one step on the same 8 pairs with
both tools in fp32 (the whole data set is one batch, so the inputs are identical) and compares the first-step loss (both
ln 2: the adapter starts at zero) and the mean summed log-probabilities of the chosen and rejected answers, which
would differ if the two tokenised, masked or truncated the pairs differently.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("sft_throughput", HERE / "sft_throughput.py")
sft_bench = sys.modules.get("sft_throughput") or importlib.util.module_from_spec(_spec)
if "sft_throughput" not in sys.modules:
    sys.modules["sft_throughput"] = sft_bench  # its dataclasses resolve their annotations through sys.modules
    _spec.loader.exec_module(sft_bench)

STAGES = ("dpo", "kto", "rm")
TOOLS = ("posttrain", "trl-default", "trl-fast", "trl-padding-free")
PARTS = ("parity", "speed")
LORA = sft_bench.LORA
LR = {"dpo": 5e-5, "kto": 5e-5, "rm": 1e-4}
BETA = 0.1
PARITY_TOLERANCE = 1e-4


# ============================================================================================== data
def make_pairs(n: int, seed: int) -> list[dict]:
    """``n`` conversational preference pairs: chosen = the conversation's last answer, rejected = that answer with
    its lines shuffled and one line altered (same length, wrong)."""
    rng = random.Random(seed + 1)
    pairs = []
    for row in sft_bench.make_conversations(n, seed):
        *prompt, answer = row["messages"]
        lines = answer["content"].split("\n")
        wrong = lines[:]
        rng.shuffle(wrong)
        i = rng.randrange(len(wrong))
        wrong[i] = wrong[i][::-1] if len(wrong[i]) > 1 else wrong[i] + "?"
        if wrong == lines:
            wrong.append(lines[0])
        pairs.append({"prompt": prompt, "chosen": [answer],
                      "rejected": [{"role": "assistant", "content": "\n".join(wrong)}]})
    return pairs


def kto_rows(pairs: list[dict]) -> list[dict]:
    """Each pair as two unpaired completions (desirable, undesirable), interleaved so every batch has both."""
    rows = []
    for p in pairs:
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return rows


def pair_tokens(pairs: list[dict], model_dir: str) -> list[tuple[int, int]]:
    """(tokens of prompt + chosen + rejected, the longer of prompt + chosen and prompt + rejected) per pair, as the
    chat template renders them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for p in pairs:
        prompt = len(tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))
        full = [len(tok.apply_chat_template(p["prompt"] + p[k], tokenize=True, return_dict=False))
                for k in ("chosen", "rejected")]
        out.append((prompt + sum(f - prompt for f in full), max(full)))
    return out


# ============================================================================================== runs
@dataclass
class RunSpec:
    stage: str
    tool: str
    model_dir: str
    train_file: str
    workdir: str
    scratch: str
    steps: int
    warmup: int
    batch_size: int
    max_length: int
    bf16: bool  # the trl-fast and trl-padding-free precision
    seed: int
    fp32: bool = False  # both tools in fp32 (the parity check: equal inputs, no bf16 rounding of either kind)


def run_posttrain(spec: RunSpec) -> dict:
    from posttrain.commands import load_config
    from posttrain.runtime import resolve_mixed_precision
    from posttrain.stages import dpo, kto, rm

    overrides = [
        f"model={spec.model_dir}", "method=lora", f"data.train={spec.train_file}", f"output_dir={spec.scratch}",
        f"max_steps={spec.steps}", f"batch_size={spec.batch_size}", f"max_length={spec.max_length}",
        f"lr={LR[spec.stage]}", "lr_scheduler=constant", "warmup_ratio=0", "weight_decay=0", "max_grad_norm=1.0",
        f"seed={spec.seed}", "log_every=1", "tensorboard=false", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}",
        f"lora.dropout={LORA['dropout']}", "lora.target_modules=all-linear",
        "precision=fp32" if spec.fp32 else "precision=auto",
    ]
    if spec.stage in ("dpo", "kto"):
        overrides.append(f"beta={BETA}")
    cfg = load_config(spec.stage, None, overrides)
    {"dpo": dpo, "kto": kto, "rm": rm}[spec.stage].train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    auto = resolve_mixed_precision("auto")  # "bf16" on CPUs with native bf16, else "no" (fp32)
    return {"precision": "fp32" if spec.fp32 or auto in (None, "no") else auto,
            "settings": {"overrides": overrides},
            "seconds": [r["train/step_seconds"] for r in rows], "losses": [r["train/loss"] for r in rows],
            "first_metrics": {k.removeprefix("train/"): v for k, v in rows[0].items() if k.startswith("train/")}}


def run_trl(spec: RunSpec) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    rows = sft_bench.read_jsonl(Path(spec.train_file))
    best = spec.tool in ("trl-fast", "trl-padding-free")
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    shared = dict(output_dir=spec.scratch, max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
                  max_length=spec.max_length, learning_rate=LR[spec.stage], lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=spec.seed, logging_steps=1,
                  save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True)
    speed = {"gradient_checkpointing": False, "bf16": spec.bf16 and not spec.fp32} if best else {}
    if spec.stage == "dpo":
        config = trl.DPOConfig(**shared, beta=BETA, loss_type=["sigmoid"], **speed,
                               **({"padding_free": True} if spec.tool == "trl-padding-free" else {}))
        trainer_cls, task = trl.DPOTrainer, "CAUSAL_LM"
    elif spec.stage == "kto":
        config = trl.KTOConfig(**shared, beta=BETA, **speed)
        trainer_cls, task = trl.KTOTrainer, "CAUSAL_LM"
    else:
        config = trl.RewardConfig(**shared, **speed)
        trainer_cls, task = trl.RewardTrainer, "SEQ_CLS"
    if task == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(spec.model_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    peft_config = LoraConfig(task_type=task, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear")

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = [time.perf_counter()]
            self.logs: list[dict] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    requested = {k: getattr(config, k, None) for k in ("gradient_checkpointing", "bf16", "padding_free")}
    clock = StepClock()
    trainer = trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[clock])
    clock.ends = [time.perf_counter()]
    trainer.train()
    used = {k: v for k, v in requested.items() if v is not None}  # as configured (a trainer may change its args)
    return {"precision": "bf16" if config.bf16 else "fp32", "settings": used,
            "seconds": [b - a for a, b in zip(clock.ends, clock.ends[1:])],
            "losses": [float(log["loss"]) for log in clock.logs],
            "first_metrics": clock.logs[0] if clock.logs else {}}


def child_main(spec_path: Path) -> None:
    import torch

    spec = RunSpec(**json.loads(spec_path.read_text()))
    torch.manual_seed(spec.seed)
    started = time.perf_counter()
    out = run_posttrain(spec) if spec.tool == "posttrain" else run_trl(spec)
    out.update(stage=spec.stage, tool=spec.tool, peak_rss_mb=sft_bench.peak_rss_mb(),
               wall_seconds=time.perf_counter() - started)
    (spec_path.parent / "result.json").write_text(json.dumps(out, indent=2))


def run_one(spec: RunSpec, timeout: int) -> dict:
    work = Path(spec.workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    (work / "result.json").unlink(missing_ok=True)
    print(f"[{spec.stage} {spec.tool}] {spec.steps} steps ...", flush=True)
    t0 = time.perf_counter()
    with (work / "log.txt").open("w") as log:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", str(work / "spec.json")], stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not (work / "result.json").exists():
        tail = (work / "log.txt").read_text()[-1500:]
        print(f"[{spec.stage} {spec.tool}] FAILED ({rc}) after {time.perf_counter() - t0:.0f} s:\n{tail}", flush=True)
        return {"stage": spec.stage, "tool": spec.tool, "failed": str(rc), "log_tail": tail}
    result = json.loads((work / "result.json").read_text())
    timed = result["seconds"][spec.warmup:]
    result["timed_steps"] = len(timed)
    result["step_seconds"] = statistics.median(timed) if timed else None
    result["examples_per_s"] = spec.batch_size / result["step_seconds"] if timed else None
    print(f"[{spec.stage} {spec.tool}] {result['step_seconds']:.2f} s/step, {result['examples_per_s']:.2f} examples/s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['precision']}", flush=True)
    return result


# ============================================================================================== report
def fastest_trl(runs: list[dict], stage: str) -> dict | None:
    done = [r for r in runs if r["stage"] == stage and r["tool"].startswith("trl") and "failed" not in r]
    return min(done, key=lambda r: r["step_seconds"]) if done else None


def speed_table(runs: list[dict]) -> str:
    lines = ["| stage | setup | precision | settings | s/step (median) | examples/s | posttrain speed-up | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        ours = next((r for r in runs if r["stage"] == stage and r["tool"] == "posttrain" and "failed" not in r), None)
        fastest = fastest_trl(runs, stage)
        for r in (r for r in runs if r["stage"] == stage):
            if "failed" in r:
                lines.append(f"| {stage} | {r['tool']} | | | failed ({r['failed']}) | | | |")
                continue
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) if r["tool"] != "posttrain" else "defaults"
            ratio = f"{r['step_seconds'] / ours['step_seconds']:.2f}x" if ours and r is not ours else ""
            tool = f"{r['tool']} (TRL's fastest)" if r is fastest else r["tool"]
            lines.append(f"| {stage} | {tool} | {r['precision']} | {settings} | {r['step_seconds']:.2f} | "
                         f"{r['examples_per_s']:.2f} | {ratio} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def targets(runs: list[dict]) -> list[dict]:
    """Issue 25's preference target: at least 3x the examples/s of TRL's fastest setup, at no more peak memory."""
    out = []
    for stage in STAGES:
        ours = next((r for r in runs if r["stage"] == stage and r["tool"] == "posttrain" and "failed" not in r), None)
        theirs = fastest_trl(runs, stage)
        if ours and theirs:
            speedup = theirs["step_seconds"] / ours["step_seconds"]
            out.append({"stage": stage, "against": theirs["tool"], "speedup": speedup, "speed_met": speedup >= 3.0,
                        "peak_rss_mb": ours["peak_rss_mb"], "trl_peak_rss_mb": theirs["peak_rss_mb"],
                        "memory_met": ours["peak_rss_mb"] <= theirs["peak_rss_mb"]})
    return out


PARITY_KEYS = {"loss": ("loss", "loss"), "logps/chosen": ("logps/chosen", "logps/chosen"),
               "logps/rejected": ("logps/rejected", "logps/rejected")}


def parity_check(ours: dict, theirs: dict) -> list[dict]:
    out = []
    for name, (k_ours, k_theirs) in PARITY_KEYS.items():
        a, b = ours["first_metrics"].get(k_ours), theirs["first_metrics"].get(k_theirs)
        if a is None or b is None:
            out.append({"metric": name, "posttrain": a, "trl": b, "ok": None})
            continue
        tol = PARITY_TOLERANCE * max(1.0, abs(b))
        out.append({"metric": name, "posttrain": a, "trl": b, "diff": a - b, "tolerance": tol, "ok": abs(a - b) <= tol})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--parts", default="parity,speed", help="parity (first-step equality), speed (throughput)")
    p.add_argument("--stages", default="dpo,kto,rm")
    p.add_argument("--tools", default="posttrain,trl-default,trl-fast",
                   help="trl-default runs DPO only unless --default-all (it is the slow setting); trl-padding-free "
                        "runs DPO only")
    p.add_argument("--default-all", action="store_true", help="run trl-default for KTO and RM too")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pairs", type=int, default=96, help="pairs in the generated data")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--trl-bf16", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results folder (default benchmarks/results/preference-<isa>-<date>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        child_main(Path(args.child))
        return {}
    from posttrain.models.loading import resolve_model
    from posttrain.runtime import cpu_flags

    parts = [x for x in args.parts.split(",") if x]
    stages = [x for x in args.stages.split(",") if x]
    tools = [x for x in args.tools.split(",") if x]
    for values, allowed, flag in ((parts, PARTS, "--parts"), (stages, STAGES, "--stages"), (tools, TOOLS, "--tools")):
        if bad := set(values) - set(allowed):
            raise SystemExit(f"{flag}: unknown {sorted(bad)}; choose from {', '.join(allowed)}")
    needs_trl = "parity" in parts or ("speed" in parts and any(t.startswith("trl") for t in tools))
    if needs_trl and importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed (needed for --parts parity and the trl-* --tools): "
                         "pip install -e '.[bench]'")
    flags = cpu_flags()
    isa = "avx512bf16" if "avx512_bf16" in flags else "avx512" if "avx512f" in flags else "avx2"
    out = Path(args.out or HERE / "results" / f"preference-{isa}-{datetime.date.today()}")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="pref-bench-"))
    model_dir = resolve_model(args.model)
    peaks = {d: sft_bench.matmul_peak(d, "cpu") for d in ("fp32", "bf16")}
    trl_bf16 = peaks["bf16"] >= peaks["fp32"] if args.trl_bf16 == "auto" else args.trl_bf16 == "on"
    report = {"date": str(datetime.date.today()), "machine": sft_bench.machine(), "isa": isa,
              "cpu_isa_env": {k: os.environ.get(k) for k in ("POSTTRAIN_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
              "versions": sft_bench.library_versions(), "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
              "trl_best_bf16": trl_bf16, "args": vars(args)}
    print(f"{isa}: matmul peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; "
          f"trl-fast in {'bf16' if trl_bf16 else 'fp32'}", flush=True)

    def spec(stage, tool, data, steps, warmup, name, fp32=False):
        return RunSpec(stage=stage, tool=tool, model_dir=model_dir, train_file=str(data), workdir=str(out / "runs" / name),
                       scratch=str(scratch / name), steps=steps, warmup=warmup, batch_size=args.batch_size,
                       max_length=args.max_length, bf16=trl_bf16, seed=args.seed, fp32=fp32)

    pairs = make_pairs(args.pairs, args.seed)
    lengths = pair_tokens(pairs, model_dir)
    report["data"] = {"pairs": len(pairs), "median_pair_tokens": statistics.median(t for t, _ in lengths),
                      "max_pair_tokens": max(t for t, _ in lengths),
                      "pairs_truncated": sum(side > args.max_length for _, side in lengths)}
    for stage_rows, name in ((pairs, "pairs.jsonl"), (kto_rows(pairs), "kto.jsonl")):
        sft_bench.write_jsonl(stage_rows, scratch / name)

    if "parity" in parts:
        # 8 pairs that fit max_length untruncated on both sides: the whole data set is the one batch
        fit = [p for p, (_, side) in zip(pairs, lengths) if side <= args.max_length][: args.batch_size]
        sft_bench.write_jsonl(fit, scratch / "parity.jsonl")
        ours = run_one(spec("dpo", "posttrain", scratch / "parity.jsonl", 1, 0, "parity-posttrain", True), args.timeout)
        theirs = run_one(spec("dpo", "trl-fast", scratch / "parity.jsonl", 1, 0, "parity-trl", True), args.timeout)
        report["parity"] = parity_check(ours, theirs) if "failed" not in ours and "failed" not in theirs else \
            {"failed": [r for r in (ours, theirs) if "failed" in r]}
        print("parity:", json.dumps(report["parity"], indent=1), flush=True)

    runs = []
    if "speed" in parts:
        for stage in stages:
            data = scratch / ("kto.jsonl" if stage == "kto" else "pairs.jsonl")
            for tool in tools:
                if (tool == "trl-default" and stage != "dpo" and not args.default_all) or (
                        tool == "trl-padding-free" and stage != "dpo"):
                    continue
                runs.append(run_one(spec(stage, tool, data, args.warmup + args.steps, args.warmup,
                                         f"{stage}-{tool}"), args.timeout))
        report["runs"] = runs
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    md = [f"# Preference throughput, {report['date']} ({isa})", "",
          f"Machine: {report['machine'].get('Model name', '?')}, {report['machine']['cpu_count']} CPUs; "
          f"ISA env {report['cpu_isa_env']}; matmul peak fp32 {peaks['fp32'] / 1e9:.1f}, bf16 {peaks['bf16'] / 1e9:.1f} "
          f"GFLOP/s. Data: {len(pairs)} pairs, median {report['data']['median_pair_tokens']:.0f} tokens per pair "
          f"(prompt + chosen + rejected), longest {report['data']['max_pair_tokens']}; batch {args.batch_size}, "
          f"max_length {args.max_length}; {args.steps} timed steps after {args.warmup} warmup.", ""]
    if runs:
        report["targets"] = targets(runs)
        md += [speed_table(runs), "", "Targets (>= 3x TRL's fastest examples/s at no more peak RSS):", ""]
        md += [f"- {t['stage']}: {t['speedup']:.2f}x {t['against']} ({'met' if t['speed_met'] else 'NOT met'}); peak RSS "
               f"{t['peak_rss_mb']:.0f} vs {t['trl_peak_rss_mb']:.0f} MB ({'met' if t['memory_met'] else 'NOT met'})"
               for t in report["targets"]] + [""]
        (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    if "parity" in report:
        md += ["Parity (one DPO step on the same 8 pairs, both in fp32):", "", "```", json.dumps(report["parity"], indent=1), "```"]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    print(f"results: {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
