"""Per-process peak memory and throughput of DDP vs FSDP2 (vs FSDP2 with CPU offload, on GPUs), side by side,
against what ``posttrain plan`` predicts for the same run.

    python benchmarks/sharding.py                                # CPU: 2 gloo processes, full FT of SmolLM2-135M
    python benchmarks/sharding.py --device cuda --nproc 1 --strategies ddp,fsdp,fsdp-offload

Each strategy is one ``torchrun`` of this file in ``--worker`` mode: every process trains with posttrain's sft
stage and writes its peak RSS (``ru_maxrss``; on CUDA also the peak allocated device memory) and its time. The
summary (``sharding.json`` and ``sharding.md`` in --out) gives, per strategy, the largest per-process peak, the
planner's prediction, and trained tokens/s. Run it alone: two torch jobs on 2 cores slow each other 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "tiny_chat.jsonl"


def overrides(args, strategy: str, out: Path) -> list[str]:
    fsdp = strategy.startswith("fsdp")
    return [f"model={args.model}", f"data.train={DATA}", f"output_dir={out}", f"method={args.method}",
            f"max_steps={args.steps}", f"batch_size={args.batch_size}", f"max_length={args.max_length}",
            f"precision={args.precision}", "tensorboard=false", "save_every=0", "packing=true",
            f"distributed.strategy={'fsdp' if fsdp else 'ddp'}", f"distributed.offload={str(strategy == 'fsdp-offload').lower()}",
            f"distributed.reshard_after_forward={str(strategy != 'fsdp-keep').lower()}"]


def worker(args) -> None:
    import torch

    from posttrain.commands import load_config
    from posttrain.stages import sft

    out = Path(args.worker)
    cfg = load_config("sft", None, overrides(args, args.strategy, out / "run"))
    t0 = time.perf_counter()
    result = sft.train(cfg)
    rank = int(os.environ.get("RANK", 0))
    record = {"rank": rank, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "seconds": time.perf_counter() - t0, "train_seconds": result.fit.seconds,
              "tokens": result.fit.tokens_seen, "final_loss": result.fit.final_train_loss,
              # what this process holds of the weights after training (a shard under fsdp)
              "param_bytes": sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in result.model.parameters())}
    if torch.cuda.is_available():
        record["peak_cuda_allocated"] = torch.cuda.max_memory_allocated()
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def predicted(args, strategy: str, nproc: int) -> int:
    from posttrain.plan.memory import estimate, per_process, resolve_precision
    from posttrain.plan.shapes import load_shape

    shape = load_shape(args.model)
    device = "cuda" if args.device == "cuda" else "cpu"
    precision = resolve_precision(args.precision if args.precision != "auto" else "auto", device)
    est = estimate(shape, args.method, seq_len=args.max_length, batch_size=args.batch_size, precision=precision,
                   device=device, packing=True)
    return per_process(est, shape, processes=nproc, strategy="fsdp" if strategy.startswith("fsdp") else "ddp",
                       offload=strategy == "fsdp-offload", precision=precision).total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--strategies", default="ddp,fsdp", help="comma list of ddp, fsdp, fsdp-keep (reshard_after_forward=false), fsdp-offload (cuda)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="full")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"sharding-{time.strftime('%Y-%m-%d')}"))
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, strategy in enumerate(s.strip() for s in args.strategies.split(",")):
        run_dir = out / strategy
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
               str(29900 + i), os.environ.get("SHARDING_WORKER", __file__), "--worker", str(run_dir), "--strategy", strategy]
        for key in ("device", "model", "method", "steps", "batch_size", "max_length", "precision"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
        print(f"{strategy}: {' '.join(cmd[3:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"{strategy} failed (see {run_dir / 'log.txt'}):\n{proc.stderr[-2000:]}", flush=True)
            rows.append({"strategy": strategy, "failed": True})
            continue
        ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(args.nproc)]
        shutil.rmtree(run_dir / "run", ignore_errors=True)  # the trained model and checkpoints: not results
        row = {"strategy": strategy, "processes": args.nproc,
               "peak_rss": max(r["peak_rss"] for r in ranks),
               "predicted": predicted(args, strategy, args.nproc),
               "tokens_per_s": ranks[0]["tokens"] / max(ranks[0]["train_seconds"], 1e-9),
               "final_loss": ranks[0]["final_loss"], "param_bytes": max(r["param_bytes"] for r in ranks)}
        if "peak_cuda_allocated" in ranks[0]:
            row["peak_cuda_allocated"] = max(r["peak_cuda_allocated"] for r in ranks)
        rows.append(row)
        print(json.dumps(row), flush=True)

    flags = ""
    if args.device == "cpu":
        cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "?")
        flags = f"{model_name}; avx512_bf16 {'yes' if 'avx512_bf16' in cpu else 'no'}; {os.cpu_count()} cores"
    else:
        import torch

        flags = torch.cuda.get_device_name(0)
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": flags, "settings": vars(args), "rows": rows}
    (out / "sharding.json").write_text(json.dumps(summary, indent=2))
    mem = "peak RSS" if args.device == "cpu" else "peak allocated (CUDA)"
    lines = [f"{args.method} fine-tune of {args.model}, {args.nproc} process(es), {args.batch_size} rows x "
             f"{args.max_length} tokens per process, {args.steps} steps; {flags}", "",
             f"| strategy | {mem} per process (measured) | planner | measured / planner | trained tokens/s |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['strategy']} | failed | | | |")
            continue
        measured = r.get("peak_cuda_allocated", r["peak_rss"])
        lines.append(f"| {r['strategy']} | {measured / 2**20:,.0f} MiB | {r['predicted'] / 2**20:,.0f} MiB | "
                     f"{measured / r['predicted']:.2f} | {r['tokens_per_s']:,.0f} |")
    (out / "sharding.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(not r.get("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
