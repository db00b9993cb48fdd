"""The plan as a person reads it: estimates per method as a table, the recommendation, the fit table."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from posttrain.methods import METHODS
from posttrain.plan.memory import SHARDABLE, MemoryEstimate, estimate, per_process, resolve_precision
from posttrain.plan.shapes import KNOWN_SHAPES, GiB, MiB, ModelShape, human_count

if TYPE_CHECKING:
    from posttrain.commands.plan import PlanConfig

RECOMMENDATION_ORDER = ("lora", "qlora", "prefix", "prompt", "full")

# (performance ceiling, risk of forgetting), with sources.
TRADE_OFFS = {
    "full": ("highest: every weight adapts",
             "highest: every weight moves (Biderman et al. 2024, 'LoRA Learns Less and Forgets Less')"),
    "lora": ("close to full FT on instruction tuning, below it on large domain shifts such as code or math (Biderman et al. 2024)",
             "low: the base stays frozen and the update is low-rank"),
    "qlora": ("as 16-bit LoRA (Dettmers et al. 2023, Guanaco)",
              "low, as LoRA; the 4-bit base adds a small quantization error"),
    "prefix": ("below LoRA; competitive on generation tasks (Li & Liang 2021)",
               "lowest: the base is untouched and the adapter can be removed"),
    "prompt": ("lowest; reaches fine-tuning quality only near 10B+ parameters (Lester et al. 2021)",
               "lowest: the base is untouched and the adapter can be removed"),
}


def human_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GB"
    if n >= MiB:
        return f"{n / MiB:.0f} MB"
    return f"{n / 1024:.0f} KB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), *(line(r) for r in rows)])


def format_estimates(shape: ModelShape, estimates: list[MemoryEstimate], cfg: PlanConfig, budget: int | None) -> str:
    precision = resolve_precision(cfg.precision, cfg.device)
    head = (f"model {shape.name}: {human_count(shape.num_params)} parameters ({shape.source})\n"
            + "".join(f"  {line}\n" for line in shape.features()) +
            f"device {cfg.device}, precision {precision}, {cfg.batch_size} rows x {cfg.seq_len} tokens, "
            f"packing {'on' if cfg.packing else 'off'}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")
    if cfg.processes > 1 or cfg.strategy != "ddp":
        head += (f"\nper process of {cfg.processes}, strategy {cfg.strategy}" + (", sharded state offloaded to CPU" if cfg.offload else "")
                 + "; batch_size is per process")
    header = ["method", "trainable", *(label for label, _ in estimates[0].rows()), "fits", "TFLOP/step", "saves"]
    rows = []
    for est in estimates:
        fits = "-" if budget is None else ("yes" if est.total <= budget else "no")
        rows.append([est.method, human_count(est.trainable_params), *(human_bytes(b) for _, b in est.rows()), fits,
                     f"{est.flops_per_step / 1e12:.2f}", human_bytes(est.output_bytes)])
    note = ("peak = weights + adapter + optimizer + quantization + runtime + max(casts + activations + logits, "
            "gradients + tied-embedding gradient sum): backward frees activations as it makes gradients; fused AdamW "
            "steps in place. comm: ddp's gradient buckets, or fsdp's gathered root unit and two layers (+ the root's "
            "whole gradient at the end of backward)")
    return f"{head}\n\n{_table(header, rows)}\n\n{note}"


def recommend(estimates: list[MemoryEstimate], budget: int) -> str:
    """The cheapest method that fits ``budget`` bytes, and the trade-offs of every planned method."""
    by_method = {e.method: e for e in estimates}
    fitting = [by_method[m] for m in RECOMMENDATION_ORDER if m in by_method and by_method[m].total <= budget]
    lines = []
    if fitting:
        best = fitting[0]
        lines.append(f"recommended: {best.method} (peak {human_bytes(best.total)} of {human_bytes(budget)}): of the methods "
                     "that fit, the cheapest step, and among equally cheap ones the highest performance ceiling")
    else:
        smallest = min(estimates, key=lambda e: e.total)
        lines.append(f"nothing planned fits {human_bytes(budget)}; the smallest is {smallest.method} at "
                     f"{human_bytes(smallest.total)}: try gradient_checkpointing=true, a smaller batch_size or seq_len")
    lora_flops = by_method["lora"].flops_per_step if "lora" in by_method else None
    lines.append("trade-offs:")
    for est in estimates:
        ceiling, forgetting = TRADE_OFFS[est.method]
        cost = f"{est.flops_per_step / 1e12:.2f} TFLOP/step"
        if lora_flops and est.method != "lora":
            cost += f" ({est.flops_per_step / lora_flops:.2f}x lora)"
        output = "a full model" if est.method == "full" else "an adapter"
        lines.append(f"  {est.method:<7} compute {cost}; saves {output} of {human_bytes(est.output_bytes)}; "
                     f"ceiling {ceiling}; forgetting {forgetting}")
    return "\n".join(lines)


TABLE_MODELS = ("1b", "7b", "13b", "65b", "70b")
TABLE_GPUS_GB = (24, 48, 80)
TABLE_DEVICES = 8  # the last column: that many 80 GB GPUs with FSDP (full, lora, qlora) or ddp (prompt, prefix)


def fit_table(cfg: PlanConfig) -> tuple[str, list[MemoryEstimate]]:
    """Which method fits which GPU, for Llama sizes, on CUDA in bf16 at cfg's batch and length.

    A cell reads 'yes' (fits), 'gc' (fits only with gradient checkpointing) or '-'. The last column is per process
    on 8 x 80 GB: full, lora and qlora sharded with FSDP2 (qlora's 4-bit linears whole on every GPU), prompt and
    prefix data parallel (each GPU holds the model).
    """
    base = {**cfg.settings(), "device": "cuda", "precision": "bf16"}
    rows, estimates = [], []
    for name in TABLE_MODELS:
        shape = KNOWN_SHAPES[name]
        for method in METHODS:
            plain = estimate(shape, method, **base)
            with_gc = estimate(shape, method, **{**base, "gradient_checkpointing": True})
            estimates.append(plain)
            cells = ["yes" if plain.total <= gb * GiB else "gc" if with_gc.total <= gb * GiB else "-" for gb in TABLE_GPUS_GB]
            strategy = "fsdp" if method in SHARDABLE else "ddp"
            many, many_gc = (per_process(e, shape, processes=TABLE_DEVICES, strategy=strategy, precision="bf16")
                             for e in (plain, with_gc))
            cells.append(("yes" if many.total <= 80 * GiB else "gc" if many_gc.total <= 80 * GiB else "-") + f" {strategy}")
            rows.append([name, method, human_bytes(plain.total), human_bytes(with_gc.total), *cells, human_bytes(many.total)])
    header = ["model", "method", "peak", "peak (gc)", *(f"{gb} GB" for gb in TABLE_GPUS_GB),
              f"{TABLE_DEVICES}x80 GB", f"peak/GPU of {TABLE_DEVICES}"]
    title = (f"fit on one GPU (cuda, bf16, {cfg.batch_size} rows x {cfg.seq_len} tokens, lora r {cfg.lora_r}): "
             "'yes' fits, 'gc' fits with gradient_checkpointing=true, '-' does not")
    return f"{title}\n\n{_table(header, rows)}", estimates


def device_memory(cfg: PlanConfig) -> int | None:
    """Bytes to fit in: device_memory_gb, else the visible GPU's or the machine's RAM; None if unknown."""
    if cfg.device_memory_gb is not None:
        return int(cfg.device_memory_gb * GiB)
    if cfg.device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


