"""``posttrain plan``: predict peak memory and FLOPs per method; recommend the cheapest method that fits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from posttrain.config import opt
from posttrain.errors import ConfigError
from posttrain.plan.memory import lora_target_set

if TYPE_CHECKING:
    from posttrain.plan.memory import MemoryEstimate

HELP = "Predict peak memory and FLOPs per method; recommend the cheapest method that fits."
EXAMPLES = ("posttrain plan model=7b device_memory_gb=24\n  posttrain plan model=7b method=full processes=8 strategy=fsdp\n"
            "  posttrain plan table=true batch_size=1")


@dataclass
class PlanConfig:
    """Predict peak memory and FLOPs per method; recommend the cheapest method that fits."""

    model: str = opt("smollm2-135m", "Model: 'smollm2-135m', a size (1b, 7b, 13b, 65b, 70b: Llama shapes), a known hub id such as Qwen/Qwen3-8B or gpt-oss-20b (shapes built in, no download), or a local HF directory.")
    method: Literal["all", "full", "lora", "qlora", "prompt", "prefix"] = opt("all", "Method to plan, or all of them.")
    seq_len: int = opt(512, "Tokens per row (max_length; packed rows are full).")
    batch_size: int = opt(8, "Rows per micro-batch.")
    device: Literal["cuda", "cpu"] = opt("cuda", "Where training runs: one CUDA GPU or the CPU (process RSS).")
    device_memory_gb: float | None = opt(None, "Memory to fit in, GB (GiB); default: the GPU's, or the machine's RAM for cpu.")
    precision: Literal["auto", "bf16", "fp32"] = opt("auto", "Forward precision (frozen weights stored in it); auto = as the engine: bf16 on cuda and on a cpu with native bf16 (AVX512-BF16/AMX), else fp32.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward.")
    packing: bool = opt(True, "Rows are packed (as sft's packing=true). Modelled as sdpa with a block-diagonal mask, an upper bound for the default packed_spans kernel.")
    loss_chunk_size: int = opt(1024, "Target positions per loss chunk (as sft's loss_chunk_size).")
    lora_r: int = opt(16, "LoRA rank (lora, qlora).")
    lora_targets: list[str] | str = opt("all-linear", "LoRA modules: all-linear or a list such as [q_proj, v_proj].")
    lora_target_experts: bool = opt(False, "MoE models: LoRA on the experts too (sft's lora.target_experts).")
    num_virtual_tokens: int = opt(20, "Virtual tokens (prompt, prefix).")
    processes: int = opt(1, "Processes (devices) the run uses; the plan is per process.")
    strategy: Literal["ddp", "fsdp"] = opt("ddp", "With processes > 1: ddp (every process holds everything) or fsdp (FSDP2: weights, gradients and optimizer state sharded; as sft's distributed.strategy).")
    offload: bool = opt(False, "fsdp on GPUs: sharded state in CPU memory (as distributed.offload).")
    table: bool = opt(False, "Print the 1B/7B/13B/65B/70B x method x 24/48/80 GB fit table (cuda, bf16) instead.")

    def validate(self) -> None:
        for key in ("seq_len", "batch_size", "loss_chunk_size", "lora_r", "num_virtual_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.device_memory_gb is not None and self.device_memory_gb <= 0:
            raise ConfigError(f"device_memory_gb: must be > 0, got {self.device_memory_gb}")
        lora_target_set(self.lora_targets)
        if self.processes < 1:
            raise ConfigError(f"processes: must be >= 1, got {self.processes}")
        if self.offload and self.strategy != "fsdp":
            raise ConfigError("offload: only with strategy=fsdp")

    def settings(self) -> dict:
        """The keyword arguments of :func:`estimate`."""
        return dict(seq_len=self.seq_len, batch_size=self.batch_size, precision=self.precision, device=self.device,
                    lora_r=self.lora_r, lora_targets=self.lora_targets, num_virtual_tokens=self.num_virtual_tokens,
                    gradient_checkpointing=self.gradient_checkpointing, packing=self.packing,
                    loss_chunk_size=self.loss_chunk_size, lora_experts=self.lora_target_experts)


# Methods in the order the recommendation tries them: cheapest step first. lora, qlora, prefix and prompt all
# cost ~4N FLOPs per token; among them a higher performance ceiling goes first, and QLoRA follows LoRA because


Config = PlanConfig


def run(cfg: PlanConfig) -> list[MemoryEstimate]:
    """Print the plan (or the fit table) and return the estimates it printed."""
    from posttrain.methods import METHODS
    from posttrain.plan.memory import SHARDABLE, estimate, per_process, resolve_precision
    from posttrain.plan.report import device_memory, fit_table, format_estimates, recommend
    from posttrain.plan.shapes import load_shape

    cfg.validate()
    if cfg.table:
        text, estimates = fit_table(cfg)
        print(text)
        return estimates
    shape = load_shape(cfg.model)
    methods = METHODS if cfg.method == "all" else (cfg.method,)
    if cfg.strategy == "fsdp" and cfg.method == "all":
        methods = tuple(m for m in methods if m in SHARDABLE)
    precision = resolve_precision(cfg.precision, cfg.device)
    estimates = [per_process(estimate(shape, m, **cfg.settings()), shape, processes=cfg.processes, strategy=cfg.strategy,
                             offload=cfg.offload, precision=precision) for m in methods]
    budget = device_memory(cfg)
    print(format_estimates(shape, estimates, cfg, budget))
    print()
    print(recommend(estimates, budget) if budget is not None else "no GPU visible: set device_memory_gb for a recommendation")
    return estimates
