"""The log-prob gap between vLLM's rollouts and the trainer, and what the importance-sampling correction does
with it: short GRPO runs with ``rollout.engine=vllm`` on the built-in arithmetic task, one per setting.

    .venv-vllm/bin/python benchmarks/vllm_logp_gap.py --out benchmarks/results/vllm-cpu-<date>/logp_gap.json

For each setting (precision x lora_sync x method, and a top-p run) it trains ``--steps`` GRPO steps and reports,
per completion token over all steps (posttrain's logged metrics, see docs/rl.md): ``rollout/logp_gap`` (mean
|log pi_trainer - log q_vLLM|), ``rollout/is_weight`` (mean truncated IS weight, cap 2) and
``rollout/is_capped`` (share of tokens whose ratio exceeded the cap), and the mean weight-sync time. Needs vLLM
(``make vllm``); run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

SETTINGS = [
    {"name": "fp32, lora, merged sync", "precision": "fp32", "method": "lora", "lora_sync": "merged"},
    {"name": "fp32, lora, adapter sync", "precision": "fp32", "method": "lora", "lora_sync": "adapter"},
    {"name": "bf16, lora, merged sync", "precision": "bf16", "method": "lora", "lora_sync": "merged"},
    {"name": "bf16, lora, adapter sync", "precision": "bf16", "method": "lora", "lora_sync": "adapter"},
    {"name": "fp32, qlora, merged sync (4-bit base)", "precision": "fp32", "method": "qlora", "lora_sync": "merged"},
    {"name": "fp32, qlora, adapter sync (vLLM: unquantised base)", "precision": "fp32", "method": "qlora",
     "lora_sync": "adapter"},
    {"name": "fp32, full fine-tuning", "precision": "fp32", "method": "full", "lora_sync": "auto"},
    {"name": "fp32, lora, merged, top_p 0.9 top_k 20", "precision": "fp32", "method": "lora", "lora_sync": "merged",
     "top_p": 0.9, "top_k": 20},
]


def run(setting: dict, args, data: Path, out: Path) -> dict:
    from posttrain.commands import load_config
    from posttrain.runtime import cpu_has_native_bf16
    from posttrain.stages import grpo

    if setting["precision"] == "bf16" and not cpu_has_native_bf16():
        return {**setting, "skipped": "no native bf16 on this CPU"}
    overrides = [
        f"model={args.model}", f"method={setting['method']}", f"data.train={data}", f"output_dir={out}",
        f"max_steps={args.steps}", "batch_size=4", "num_generations=4", "rollout_batch_size=4", "max_prompt_length=128",
        f"sampling.max_new_tokens={args.max_new_tokens}", "sampling.temperature=1.0",
        f"sampling.top_p={setting.get('top_p', 1.0)}", f"sampling.top_k={setting.get('top_k', 0)}", "lr=1e-4",
        "rewards=[{function: numeric_match}]", "guards.every=0", "tensorboard=false", f"precision={setting['precision']}",
        "rollout.engine=vllm", "rollout.vllm.memory=0.1", f"rollout.vllm.lora_sync={setting['lora_sync']}",
        "qlora.compute_dtype=auto", "lr_scheduler=constant"]
    result = grpo.train(load_config("grpo", None, overrides))
    h = result.fit.history
    return {**setting, "steps": len(h),
            "logp_gap": statistics.fmean(x["rollout/logp_gap"] for x in h),
            "is_weight": statistics.fmean(x["rollout/is_weight"] for x in h),
            "is_capped": statistics.fmean(x["rollout/is_capped"] for x in h),
            "sync_seconds": statistics.fmean(x["rollout/sync_seconds"] for x in h),
            "per_step_gap": [x["rollout/logp_gap"] for x in h]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--only", default=None, help="comma-separated setting indices")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from posttrain.demo.arith_task import make_rows

    tmp = Path(tempfile.mkdtemp(prefix="logp-gap-"))
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(64, "train", 0)))
    chosen = [SETTINGS[int(i)] for i in args.only.split(",")] if args.only else SETTINGS
    rows = []
    for i, setting in enumerate(chosen):
        try:
            rows.append(run(setting, args, data, tmp / f"run{i}"))
        except Exception as e:  # a setting that fails is reported, the others still run
            rows.append({**setting, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| setting | mean abs log-prob gap | mean IS weight (cap 2) | tokens over the cap | sync s |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "logp_gap" in r:
            lines.append(f"| {r['name']} | {r['logp_gap']:.2e} | {r['is_weight']:.4f} | {r['is_capped']:.2%} | "
                         f"{r['sync_seconds']:.3f} |")
        else:
            lines.append(f"| {r['name']} | {r.get('skipped') or r.get('error')} | | | |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
        Path(args.out).with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
