"""Where one posttrain SFT forward+backward spends its time, by kind of work, with the matmuls' FLOP/s.

Same data and settings as ``sft_throughput.py`` (generated chat rows, LoRA r 16 on all linear layers, 8 packed
rows of 512 tokens, fp32 on CPU). One warm-up micro-batch, then ``torch.profiler`` with input shapes over one
more; every aten op's self time goes to one category:

- body matmuls: the decoder's q/k/v/o/gate/up/down projections (forward and input gradients), FLOPs counted
  from the recorded shapes;
- head matmuls: the output projection at target positions (logits, and the input gradient);
- LoRA rank-r matmuls and merges (any matmul with the adapter's rank as a dimension);
- attention: the SDPA kernels;
- everything else that is an aten op (elementwise, norms, rotary, softmax, copies, allocation).

It shows how close the step is to its matmul floor: the body's FLOPs at the measured peak are a lower bound on
the step's time that no change outside the matmul kernels can beat.

    python benchmarks/step_breakdown.py --out benchmarks/results/cpu-2026-11-27-fast/lora-step-breakdown.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sft_throughput as bench  # noqa: E402  (the benchmark's data generator and peak measurement)

ATTENTION = ("attention (SDPA kernels, posttrain's AVX512-BF16 span kernel, or the bf16 CPU span products: bmm, "
             "head-dim mm, softmax, masks)")


def categorize(name: str, shapes, rank: int | None, head_dim: int = 64) -> tuple[str, float]:
    if name == "aten::bmm" and shapes:  # only attention's span products use bmm in a step
        a, b = shapes[0], shapes[1]
        return ATTENTION, 2.0 * a[0] * a[1] * a[2] * b[2]
    if name in ("aten::mm", "aten::addmm") and shapes:
        mats = [s for s in shapes if len(s) == 2]
        # mm(a, b[, out=]) or addmm(bias, a, b): the product's operands
        a, b = (mats[0], mats[1]) if name == "aten::mm" else (mats[-2], mats[-1])
        flops = 2.0 * a[0] * a[1] * b[1]
        dims = set(a) | set(b)
        if max(dims) >= 10_000:
            return "head matmuls", flops
        if rank is not None and rank in dims:
            return "LoRA rank-r matmuls and merges", flops
        if a[1] == head_dim:  # attention's fp32 scores and dP: the inner dimension is the head's
            return ATTENTION, flops
        return "body matmuls (q, k, v, o, gate, up, down)", flops
    if "SpanAttention" in name:  # the autograd Functions' own time: all of it for the C++ kernel (no aten ops)
        return ATTENTION, 0.0
    if "scaled_dot_product" in name or name in ("aten::_softmax", "aten::masked_fill_"):
        return ATTENTION, 0.0
    if name.startswith("aten::"):
        return "elementwise, norms, rotary, softmax, copies, allocation", 0.0
    return "autograd and Python overhead", 0.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--batch", type=int, default=15, help="which batch of 8 packed rows to profile")
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size of the peak measurement")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--top", type=int, default=0, help="also list the N slowest ops outside the matmuls")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32, or bf16 autocast with the frozen base stored in bf16 (what precision=auto picks on a "
                        "CPU with AVX512-BF16 or AMX); the matmul peak is measured in the same dtype")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import profile

    from posttrain.commands import load_config
    from posttrain.data.batching import collate_packed, pack_examples
    from posttrain.data.dataset import load_sft_dataset
    from posttrain.engine.setup import load_tokenizer_for
    from posttrain.losses import sft_loss
    from posttrain.models.adapters import build_model
    from posttrain.models.forward import target_logps
    from posttrain.models.loading import resolve_model

    from posttrain.runtime import keep_cpu_heap

    keep_cpu_heap()  # as the training engine does: activations reuse the heap instead of fresh pages every step
    scratch = Path(tempfile.mkdtemp(prefix="posttrain-breakdown-"))
    train = scratch / "train.jsonl"
    bench.write_jsonl(bench.make_conversations(args.rows, seed=0), train)
    lora = [f"lora.r={bench.LORA['r']}", f"lora.alpha={bench.LORA['alpha']}", f"lora.dropout={bench.LORA['dropout']}"]
    cfg = load_config("sft", None, [f"model={resolve_model(args.model)}", f"method={args.method}",
                                    f"data.train={train}", f"output_dir={scratch / 'out'}", "max_length=512",
                                    "lora.target_modules=all-linear", "packing=true", "precision=auto",
                                    "gradient_checkpointing=false", "batch_size=8", *lora])
    tokenizer = load_tokenizer_for(cfg)
    rows, _ = load_sft_dataset(train, tokenizer, max_length=512)
    packs = pack_examples(rows, 512)
    bf16 = args.precision == "bf16"
    model, _ = build_model(cfg, mixed_precision="bf16" if bf16 else "no")
    model.train()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    which = max(1, min(args.batch, len(packs) // 8 - 1))  # a small --rows still gives a warm-up and a profiled batch
    batches = [collate_packed(packs[i * 8 : (i + 1) * 8], tokenizer.pad_token_id) for i in (which - 1, which)]

    def step(batch) -> tuple[int, float]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logps, _ = target_logps(model, batch, cfg.loss_chunk_size)
            loss_sum, _ = sft_loss(logps)
        (loss_sum / max(logps.numel(), 1)).backward()  # mean over the micro-batch's targets, as one engine step
        return logps.numel(), float(loss_sum.detach()) / max(logps.numel(), 1)

    step(batches[0])  # warm-up
    start = time.perf_counter()
    with profile(record_shapes=True) as prof:
        targets, loss = step(batches[1])
    wall = time.perf_counter() - start
    totals: dict[str, list[float]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        cat, flops = categorize(event.key, event.input_shapes, None if args.method == "full" else bench.LORA["r"],
                                head_dim)
        entry = totals.setdefault(cat, [0.0, 0.0])
        entry[0] += event.self_cpu_time_total / 1e6
        entry[1] += flops * event.count
    profiled = sum(v[0] for v in totals.values())
    others: dict[str, list[float]] = {}
    for event in prof.key_averages():
        if event.key not in ("aten::mm", "aten::addmm"):
            entry = others.setdefault(event.key, [0.0, 0])
            entry[0] += event.self_cpu_time_total / 1e6
            entry[1] += event.count
    top = [{"op": k, "seconds": round(s, 3), "calls": int(n)}
           for k, (s, n) in sorted(others.items(), key=lambda kv: -kv[1][0])[: args.top]]
    peak = bench.matmul_peak(args.precision, "cpu", args.peak_size)
    rows_out = [{"category": cat, "seconds": round(s, 2), "share": round(s / profiled, 3),
                 "tflop": round(f / 1e12, 3), "gflop_per_s": round(f / s / 1e9, 1) if f else None}
                for cat, (s, f) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    matmul_flops = sum(v[1] for v in totals.values())
    result = {"method": args.method, "precision": args.precision, "targets": targets, "loss": loss, "wall_s_profiled": round(wall, 2),
              "profiled_self_s": round(profiled, 2), f"{args.precision}_peak_gflop_per_s": round(peak / 1e9, 1),
              "matmul_tflop": round(matmul_flops / 1e12, 3),
              "matmul_floor_s": round(matmul_flops / peak, 2), "categories": rows_out,
              "torch": torch.__version__, **({"top_other_ops": top} if top else {})}
    print(f"{args.method}: {targets} target tokens, loss {loss:.5f}; profiled {profiled:.2f} s of op time "
          f"(wall {wall:.2f} s with the profiler on); {args.precision} peak {peak / 1e9:.1f} GFLOP/s")
    print("| category | seconds | share | TFLOP | GFLOP/s |\n|---|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['category']} | {r['seconds']:.2f} | {r['share']:.0%} | {r['tflop']:.3f} | {r['gflop_per_s'] or ''} |")
    print(f"matmuls: {matmul_flops / 1e12:.3f} TFLOP = {matmul_flops / peak:.1f} s at the measured peak")
    if top:
        print("| op (outside the matmuls) | seconds | calls |\n|---|---:|---:|")
        for r in top:
            print(f"| {r['op']} | {r['seconds']:.3f} | {r['calls']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
