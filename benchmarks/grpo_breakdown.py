"""Where one posttrain GRPO step spends its time: the rollout, the reference pass and the policy's forward+backward.

Same model, LoRA and task as ``grpo_throughput.py`` (SmolLM2-135M, LoRA r 16 on all linear layers, fp32, the
arithmetic prompts), on CPU:

- **rollout**: the rollout engine (:class:`~posttrain.rl.rollout.RolloutSampler`) samples ``--prompts`` prompts x
  ``--num-generations`` completions of up to ``--max-new-tokens`` tokens (one warm-up call, then one timed and one
  profiled);
- **reference** and **policy**: one micro-batch of ``--micro-batch-prompts`` groups in the shared-prompt layout
  (:mod:`posttrain.data.groups`) with random completions of 30-64 tokens: the no-gradient reference pass (adapter
  disabled) and the policy's forward+backward of the completion log-probs, each timed, then profiled.

Every aten op's self time goes to a category of ``step_breakdown.categorize`` (body matmuls, head matmuls, LoRA
matmuls, attention, the rest), with the matmuls' FLOP/s; the matmul rows show how close each part is to what
its matrix products alone take at the speed MKL reaches on these shapes.

    python benchmarks/grpo_breakdown.py --out benchmarks/results/grpo-avx2-2026-12-06-prefix-kernel/breakdown.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpo_throughput as bench  # noqa: E402  (the task's prompts and the LoRA settings)
from step_breakdown import categorize  # noqa: E402


def profile_call(fn, rank: int, head_dim: int) -> dict:
    """Wall seconds of one call, then its op time by category (a second call under the profiler)."""
    from torch.profiler import profile

    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    with profile(record_shapes=True) as prof:
        fn()
    totals: dict[str, list[float]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        cat, flops = categorize(event.key, event.input_shapes, rank, head_dim)
        entry = totals.setdefault(cat, [0.0, 0.0])
        entry[0] += event.self_cpu_time_total / 1e6
        entry[1] += flops * event.count
    rows = [{"category": c, "seconds": round(s, 3), "gflop": f / 1e9,
             "gflop_per_s": round(f / s / 1e9, 1) if f and s else None}
            for c, (s, f) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    return {"wall_s": round(wall, 3), "op_s": round(sum(v[0] for v in totals.values()), 3), "categories": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=8, help="prompts in the rollout")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch-prompts", type=int, default=2, help="groups in the profiled micro-batch")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from posttrain.commands import load_config
    from posttrain.data.groups import collate_groups
    from posttrain.data.prompts import prompt_token_ids
    from posttrain.engine.setup import load_tokenizer_for
    from posttrain.models.adapters import build_model
    from posttrain.models.forward import target_logps
    from posttrain.models.loading import resolve_model
    from posttrain.rl.rollout import RolloutSampler, Sampling
    from posttrain.runtime import keep_cpu_heap

    keep_cpu_heap()  # as the training engine does
    scratch = Path(tempfile.mkdtemp(prefix="posttrain-grpo-breakdown-"))
    rows = bench.make_prompts(3 * args.prompts, 0)
    bench.write_jsonl(rows, scratch / "prompts.jsonl")
    lora = [f"lora.r={bench.LORA['r']}", f"lora.alpha={bench.LORA['alpha']}", f"lora.dropout={bench.LORA['dropout']}"]
    cfg = load_config("grpo", None, [f"model={resolve_model(args.model)}", "method=lora", "precision=fp32",
                                     f"data.train={scratch / 'prompts.jsonl'}", f"output_dir={scratch / 'out'}",
                                     "lora.target_modules=all-linear", "rewards=[{function: numeric_match}]", *lora])
    tokenizer = load_tokenizer_for(cfg)
    model, _ = build_model(cfg, mixed_precision="no")
    with torch.no_grad():  # a trained-looking adapter (B = 0 would make the policy the reference)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01, generator=torch.Generator().manual_seed(0))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    prompts = [prompt_token_ids(tokenizer, r["prompt"]) for r in rows]
    sampler = RolloutSampler(tokenizer, prompts_per_batch=args.prompts, eos_token_ids=[tokenizer.eos_token_id])
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0)
    n = args.num_generations
    seeds = list(range(args.prompts))
    sampler.generate(model, prompts[: args.prompts], n, sampling, seeds=seeds)  # warm-up
    tokens = sum(len(c.token_ids) for c in sampler.generate(model, prompts[args.prompts : 2 * args.prompts], n,
                                                               sampling, seeds=seeds))
    rollout = profile_call(lambda: sampler.generate(model, prompts[args.prompts : 2 * args.prompts], n, sampling,
                                                    seeds=seeds), bench.LORA["r"], head_dim)
    rollout["completion_tokens"] = tokens

    rng = random.Random(0)

    def micro_batch(first: int) -> dict:
        groups = [(prompts[i], [[rng.randrange(100, 40000) for _ in range(rng.randint(30, 64))] for _ in range(n)])
                  for i in range(first, first + args.micro_batch_prompts)]
        return collate_groups(groups, tokenizer.pad_token_id, None)

    warm, batch = micro_batch(0), micro_batch(args.micro_batch_prompts)
    model.train()

    def reference(b=batch):
        with torch.no_grad(), model.disable_adapter():
            target_logps(model, b, cfg.loss_chunk_size, 1.0)

    def policy(b=batch):
        logps, _ = target_logps(model, b, cfg.loss_chunk_size, 1.0)
        logps.sum().backward()

    reference(warm)
    policy(warm)
    parts = {"rollout": rollout, "reference": profile_call(reference, bench.LORA["r"], head_dim),
             "policy_forward_backward": profile_call(policy, bench.LORA["r"], head_dim)}
    targets = int((batch["labels"] != -100).sum())
    result = {"rollout_completions": args.prompts * n, "micro_batch": {"groups": args.micro_batch_prompts,
              "positions": int(batch["input_ids"].numel()), "targets": targets}, "parts": parts,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, part in parts.items():
        print(f"\n{name}: wall {part['wall_s']:.2f} s, op time {part['op_s']:.2f} s")
        print("| category | seconds | GFLOP | GFLOP/s |\n|---|---:|---:|---:|")
        for r in part["categories"]:
            print(f"| {r['category']} | {r['seconds']:.2f} | {r['gflop']:.1f} | {r['gflop_per_s'] or ''} |")
    print(f"\nrollout: {tokens} completion tokens; micro-batch: {targets} targets in "
          f"{result['micro_batch']['positions']} positions")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
