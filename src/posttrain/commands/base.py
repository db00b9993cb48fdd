"""Config sections several commands share: the training keys every stage takes (:class:`TrainConfig`), the
RL stages' keys (:class:`RLConfig`) and the sampling section of generate, chat and eval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config import opt, section
from posttrain.errors import ConfigError
from posttrain.vllm_backend import VLLMSection


@dataclass
class DataConfig:
    train: str | None = opt(None, "Training data: JSONL, JSON, Parquet, CSV or a `datasets` directory (required).")
    eval: str | None = opt(None, "Held-out data in the same formats; eval loss is logged every `eval_every` steps.")
    skip_invalid: bool = opt(False, "Drop invalid rows (counted and reported by reason) instead of stopping.")
    overflow: Literal["truncate", "drop"] = opt("truncate", "Rows longer than max_length: keep the first max_length tokens, or drop the row.")
    loss_on: Literal["completion", "all"] = opt("completion", "Train on assistant/completion tokens only, or on every token.")


@dataclass
class LoraSection:
    r: int = opt(16, "LoRA rank.")
    alpha: float = opt(32.0, "LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = opt(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] | str = opt("all-linear", "Modules to adapt: 'all-linear' (every linear layer but the output and score heads; an MoE model's routers are not linear layers and stay frozen) or a list of names such as [q_proj, v_proj].")
    target_experts: bool = opt(False, "MoE models (Qwen3-MoE, gpt-oss): also adapt the experts' stacked projections, one LoRA pair per expert through PEFT's target_parameters, so the adapter grows with the number of experts. Not with DoRA.")
    dora: bool = opt(False, "DoRA: weight-decomposed LoRA (Liu et al. 2024).")


@dataclass
class QLoraSection:
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type for the frozen base (bitsandbytes).")
    double_quant: bool = opt(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "dtype of the 4-bit matmuls; auto = the run's precision: bf16 under bf16 (a GPU, or a CPU with AVX512-BF16/AMX), else fp32.")


@dataclass
class PromptSection:
    num_virtual_tokens: int = opt(20, "Number of trainable soft-prompt tokens.")
    init_text: str | None = opt(None, "Initialise the soft prompt from this text's token embeddings (random if unset).")


@dataclass
class PrefixSection:
    num_virtual_tokens: int = opt(20, "Number of trainable prefix key/value positions per layer.")
    projection: bool = opt(False, "Reparameterise the prefix through an MLP (Li & Liang 2021).")



@dataclass
class DistributedSection:
    strategy: Literal["auto", "ddp", "fsdp"] = opt("auto", "How processes split the work (under torchrun or accelerate launch): ddp = every process holds the whole model, gradients and optimizer state; fsdp = PyTorch FSDP2 (fully_shard per decoder layer, then the root), each process holds 1/N of the parameters, gradients and optimizer state and gathers one layer at a time. auto = fsdp when accelerate's config says FSDP (accelerate launch --config_file), else ddp.")
    reshard_after_forward: bool = opt(True, "fsdp: free each layer's gathered parameters after its forward and gather them again in backward (less memory, one more all-gather per layer); false keeps them until backward (ZeRO-2-like).")
    offload: bool = opt(False, "fsdp on GPUs: keep the sharded parameters, gradients and optimizer state in CPU memory (FSDP2's CPUOffloadPolicy; the optimizer steps on the CPU). Nothing to offload to on a CPU-only machine.")
    param_dtype: Literal["auto", "float32", "bfloat16"] = opt("auto", "fsdp: dtype the gathered parameters are cast to for compute (FSDP2's MixedPrecisionPolicy); the sharded master copy stays fp32. auto = keep them as stored and let `precision` autocast, as ddp does.")
    reduce_dtype: Literal["float32", "bfloat16"] = opt("float32", "fsdp: dtype of the gradient reduce-scatter (with param_dtype bfloat16).")


@dataclass
class TrainConfig:
    """Keys shared by every training stage."""

    model: str = opt("smollm2-135m", "Base model: 'smollm2-135m' (embedded), a local HF directory, or a hub id.")
    adapter: str | None = opt(None, "A PEFT adapter directory to start from (continues training it).")
    method: Literal["full", "lora", "qlora", "prompt", "prefix"] = opt("lora", "How parameters are updated: full, lora, qlora, prompt or prefix.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code. Off unless you trust the source.")
    data: DataConfig = section(DataConfig, "Datasets.")
    output_dir: str = opt("runs/sft", "Where checkpoints, logs and the final model/adapter go.")
    max_steps: int = opt(-1, "Optimizer steps to run; -1 derives them from `epochs`.")
    epochs: float = opt(1.0, "Passes over the training data (used when max_steps is -1).")
    seed: int = opt(42, "Seed for initialisation, data order and sampling.")
    resume: bool | str = opt(False, "true: resume from the latest checkpoint in output_dir; or a checkpoint path.")
    lr: float = opt(2e-4, "Peak learning rate (AdamW).")
    lr_scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "Decay after warmup.")
    warmup_ratio: float = opt(0.03, "Fraction of steps spent on linear warmup.")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 disables).")
    batch_size: int = opt(8, "Sequences per micro-batch per process.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    max_length: int = opt(1024, "Maximum tokens per sequence; longer rows follow data.overflow.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "Mixed precision: auto = bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    attn_implementation: Literal["auto", "sdpa", "packed_spans", "sdpa_segments", "eager", "flash_attention_2"] = opt("auto", "Attention kernel: auto = packed_spans (exact causal attention per packed sequence, for every family), or flash_attention_2 on CUDA when flash-attn is installed (not for gpt-oss's sinks). sdpa and eager use per-layer packed masks; sdpa_segments is packed_spans' earlier name.")
    packing: bool = opt(True, "Pack several examples into each row of max_length tokens (best-fit decreasing), each attending only to itself; batch_size then counts rows. Not used by prompt/prefix tuning.")
    loss_chunk_size: int = opt(1024, "Target positions per chunk of the output projection + cross-entropy; the full logits tensor is never built.")
    log_every: int = opt(1, "Log metrics every N steps.")
    eval_every: int = opt(0, "Evaluate on data.eval every N steps (0: only at the end).")
    save_every: int = opt(0, "Checkpoint every N steps (0: only at the end).")
    keep_last: int = opt(2, "Checkpoints to keep.")
    tensorboard: bool = opt(True, "Also write TensorBoard event files under output_dir/tensorboard.")
    lora: LoraSection = section(LoraSection, "LoRA/DoRA settings (method lora; also used by qlora).")
    qlora: QLoraSection = section(QLoraSection, "4-bit base settings (method qlora).")
    prompt: PromptSection = section(PromptSection, "Prompt tuning settings (method prompt).")
    prefix: PrefixSection = section(PrefixSection, "Prefix tuning settings (method prefix).")
    distributed: DistributedSection = section(DistributedSection, "Several processes (torchrun / accelerate launch): data parallel or FSDP2 sharding.")

    def validate(self) -> None:
        """Cross-field checks that a type cannot express."""
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "max_length": self.max_length,
                    "keep_last": self.keep_last, "log_every": self.log_every, "loss_chunk_size": self.loss_chunk_size, "lora.r": self.lora.r,
                    "prompt.num_virtual_tokens": self.prompt.num_virtual_tokens,
                    "prefix.num_virtual_tokens": self.prefix.num_virtual_tokens}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps: must be a positive number of steps, or -1 to use epochs; got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ConfigError(f"epochs: must be > 0 when max_steps is -1, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas: expected two numbers, got {self.adam_betas}")
        if not self.data.train:
            raise ConfigError("data.train: required (a JSONL/JSON/Parquet/CSV file or a datasets directory)")



@dataclass
class RolloutSamplingSection:
    max_new_tokens: int = opt(128, "Most tokens generated per completion (the EOS token counts).")
    temperature: float = opt(1.0, "Sampling temperature of rollouts; the loss uses the same temperature. 0 = greedy (no exploration).")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1 = off).")
    top_k: int = opt(0, "Sample from the k most likely tokens (0 = off).")
    stop: list[str] = opt([], "Stop strings: a completion ends at the first one (the text is cut before it).")


@dataclass
class GuardsSection:
    rewards: list[dict] = opt([], "Held-out guard rewards, never optimised: same item format as `rewards`. Scored on data.eval prompts every `guards.every` steps (logged as guard/<name>, with guard/gap = held-out reward - guard total).")
    rules: list[dict] = opt([], "Thresholds: items {metric, min and/or max, action: warn|stop, patience, after}. Metrics: reward, kl, kl/trend, length/mean, length/change, length/trend, entropy, duplicates/share, guard/<name>, guard/gap, ...")
    every: int = opt(10, "Evaluate held-out rewards and guard rewards every N steps (0: only at the end).")
    window: int = opt(10, "Steps in the trend windows (length/trend, length/change, kl/trend).")
    keep_good: bool = opt(True, "Keep an in-memory copy of the trainable weights of the last policy that passed every guard, and save it when a guard stops the run.")


@dataclass
class RolloutSection:
    engine: Literal["builtin", "vllm"] = opt("builtin", "What generates the rollouts: builtin = posttrain's own KV-cache decoding loop on the training model; vllm = a vLLM engine given the trainer's weights after every optimizer step (LoRA as a new adapter, full fine-tuning by pushing the weights; see rollout.vllm). Needs vLLM installed (`make vllm`).")
    correction: Literal["auto", "none", "truncate", "mask"] = opt("auto", "Importance-sampling correction for the gap between the distribution the engine sampled from and the trainer's: truncate = weight each token's surrogate by min(pi_trainer/q_engine, correction_cap) (TIS); mask = drop tokens whose ratio exceeds the cap; none. auto = truncate with vllm, none with builtin (which samples from the training model itself).")
    correction_cap: float = opt(2.0, "The cap C of the importance-sampling correction (ratios above it are truncated to C, or masked).")
    vllm: VLLMSection = section(VLLMSection, "vLLM engine settings (rollout.engine=vllm).")

    def resolved_correction(self) -> str:
        if self.correction != "auto":
            return self.correction
        return "truncate" if self.engine == "vllm" else "none"


@dataclass
class RLConfig(TrainConfig):
    """Shared by the RL stages: prompts in, rollouts, rewards, guards."""

    lr: float = opt(1e-5, "Peak learning rate (AdamW); RL wants small steps: ~1e-5 to 5e-5 for LoRA, ~1e-6 for full fine-tuning.")
    warmup_ratio: float = opt(0.0, "Fraction of steps spent on linear warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = opt("constant", "Decay after warmup.")
    batch_size: int = opt(4, "PROMPTS per micro-batch per process; each gets num_generations completions.")
    max_prompt_length: int = opt(512, "Longer prompts are dropped (and counted).")
    num_generations: int = opt(8, "Completions sampled per prompt (a GRPO group).")
    rollout_batch_size: int = opt(16, "Prompts generated together by the rollout engine (each with its num_generations samples).")
    rollout: RolloutSection = section(RolloutSection, "The rollout engine (builtin or vLLM) and its off-policy correction.")
    sampling: RolloutSamplingSection = section(RolloutSamplingSection, "Rollout sampling.")
    rewards: list[dict] = opt([], "Reward sources (required): items with one of function (module:function or a verifier name: exact_match, numeric_match, regex_match, json_schema, code_tests), reward_model (a `posttrain rm` directory) or judge ({base_url, model, ...}); optional name, weight (default 1), kwargs, timeout.")
    guards: GuardsSection = section(GuardsSection, "Reward-hacking guards.")
    eval_num_generations: int = opt(1, "Completions per held-out prompt at evaluation.")
    eval_temperature: float = opt(0.0, "Sampling temperature at evaluation (0 = greedy, reproducible).")
    max_length: int = opt(1024, "Unused by RL stages: sequences are at most max_prompt_length + sampling.max_new_tokens.")
    packing: bool = opt(True, "Pack the rollout sequences of a micro-batch into rows (no attention across sequences).")
    share_prompt: bool = opt(True, "Training and reference forwards compute each prompt once for all completions of its group (its completions attend to one shared copy); exact, and P-1+n instead of n*P prompt positions. Not with flash-attention varlen.")

    def validate(self) -> None:
        super().validate()
        if self.method in ("prompt", "prefix"):
            raise ConfigError(f"method: RL stages support full, lora and qlora, not {self.method}")
        if self.num_generations < 1:
            raise ConfigError(f"num_generations: must be >= 1, got {self.num_generations}")
        if not self.rewards:
            raise ConfigError("rewards: required, a list of reward sources, e.g. [{function: numeric_match}]")
        if self.max_prompt_length < 1 or self.rollout_batch_size < 1:
            raise ConfigError("max_prompt_length and rollout_batch_size: must be >= 1")
        if not self.rollout.correction_cap > 0:
            raise ConfigError(f"rollout.correction_cap: must be > 0, got {self.rollout.correction_cap}")
        if self.rollout.engine == "vllm":
            self.rollout.vllm.validate()
            if self.lora.dora and self.method in ("lora", "qlora"):
                raise ConfigError("rollout.engine=vllm: vLLM has no DoRA; set lora.dora=false or rollout.engine=builtin")
            if self.lora.target_experts and self.method in ("lora", "qlora"):
                raise ConfigError("rollout.engine=vllm: vLLM cannot load LoRA on MoE experts' stacked parameters; "
                                  "set lora.target_experts=false or rollout.engine=builtin")



@dataclass
class SamplingSection:
    max_new_tokens: int = opt(256, "Tokens to generate at most.")
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    top_k: int = opt(0, "Sample from the k most likely tokens (0: off).")

