"""Typed configs for every command, validated in one place.

Each field is documented once, in its ``help`` metadata; ``posttrain <stage> --help`` renders the same
text with the defaults. A config comes from an optional YAML file plus dotted ``key=value`` overrides
(``lora.r=32``); values in overrides are parsed as YAML scalars (``true``, ``3e-4``, ``[q_proj, v_proj]``).
Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from posttrain.errors import ConfigError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its one line of documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------------------------- sections
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


# --------------------------------------------------------------------------------------------- stages
METHODS = ("full", "lora", "qlora", "prompt", "prefix")


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
    attn_implementation: Literal["auto", "sdpa", "packed_spans", "sdpa_segments", "eager", "flash_attention_2"] = opt("auto", "Attention kernel. auto = packed_spans (causal attention per packed sequence, exact for every family: sliding windows, soft-capping and sinks included; plain causal spans take the fast kernels), or flash_attention_2 on CUDA when flash-attn is installed (not for gpt-oss's sinks); sdpa and eager get per-layer packed masks that carry the windows (sdpa_segments: packed_spans' earlier name).")
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
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: imitate assistant/completion tokens."""


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation and its family on prompt/chosen/rejected pairs."""

    output_dir: str = opt("runs/dpo", "Where checkpoints, logs and the final model/adapter go.")
    lr: float = opt(5e-5, "Peak learning rate (AdamW). Preference stages want less than SFT: ~5e-5 for LoRA, ~5e-7 for full fine-tuning.")
    batch_size: int = opt(8, "Preference pairs per micro-batch per process (chosen and rejected run in one forward pass).")
    loss: Literal["sigmoid", "robust", "ipo", "hinge", "simpo"] = opt("sigmoid", "sigmoid (DPO), robust (rDPO), ipo, hinge (SLiC), or simpo (reference-free, length-normalised).")
    beta: float = opt(0.1, "Strength of the KL anchor to the reference (DPO's beta); SimPO's reward scale (its paper uses 2-2.5).")
    label_smoothing: float = opt(0.0, "Assumed rate of flipped preference labels, in [0, 0.5): conservative DPO (sigmoid) or robust DPO (robust).")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin gamma.")
    precompute_ref: bool = opt(False, "Compute the reference log-probs once before training (with the initial model) and cache them in output_dir: one forward pass per step instead of two, and no reference copy in memory.")

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ConfigError(f"label_smoothing: only used by loss sigmoid or robust, not {self.loss}")


@dataclass
class KTOConfig(TrainConfig):
    """Kahneman-Tversky optimisation on unpaired prompt/completion/label (thumbs up/down) data."""

    output_dir: str = opt("runs/kto", "Where checkpoints, logs and the final model/adapter go.")
    lr: float = opt(5e-5, "Peak learning rate (AdamW): ~5e-5 for LoRA, ~5e-7 for full fine-tuning.")
    batch_size: int = opt(8, "Completions per micro-batch per process.")
    beta: float = opt(0.1, "Strength of the KL anchor to the reference.")
    desirable_weight: float = opt(1.0, "Loss weight of desirable (label true) completions, lambda_D.")
    undesirable_weight: float = opt(1.0, "Loss weight of undesirable (label false) completions, lambda_U. The paper suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3].")
    kl_estimate: bool = opt(True, "Estimate the reference point z0 = KL(policy || reference) from mismatched prompt/completion pairs in each batch (an extra no-gradient forward); false uses z0 = 0.")
    precompute_ref: bool = opt(False, "Compute the reference log-probs once before training and cache them in output_dir.")

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class RMConfig(TrainConfig):
    """A Bradley-Terry reward model: a scalar head on the base LM, trained on prompt/chosen/rejected pairs."""

    output_dir: str = opt("runs/rm", "Where checkpoints, logs and the reward model (or its adapter) go.")
    lr: float = opt(1e-4, "Peak learning rate (AdamW).")
    batch_size: int = opt(8, "Preference pairs per micro-batch per process.")
    center_rewards: float = opt(0.0, "Coefficient of (r_chosen + r_rejected)^2, which keeps rewards centred on 0 (Eisenstein et al. 2023); 0.01 is typical.")


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
class RLConfig(TrainConfig):
    """Shared by the RL stages: prompts in, rollouts, rewards, guards."""

    lr: float = opt(1e-5, "Peak learning rate (AdamW); RL wants small steps: ~1e-5 to 5e-5 for LoRA, ~1e-6 for full fine-tuning.")
    warmup_ratio: float = opt(0.0, "Fraction of steps spent on linear warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = opt("constant", "Decay after warmup.")
    batch_size: int = opt(4, "PROMPTS per micro-batch per process; each gets num_generations completions.")
    max_prompt_length: int = opt(512, "Longer prompts are dropped (and counted).")
    num_generations: int = opt(8, "Completions sampled per prompt (a GRPO group).")
    rollout_batch_size: int = opt(16, "Prompts generated together by the rollout engine (each with its num_generations samples).")
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


@dataclass
class GRPOConfig(RLConfig):
    """Group relative policy optimisation (and RLOO): group-normalised rewards, clipped ratio, k3 KL."""

    output_dir: str = opt("runs/grpo", "Where checkpoints, logs, the report and the final adapter/model go.")
    advantage: Literal["grpo", "rloo"] = opt("grpo", "grpo: (r - group mean) [/ group std]; rloo: r - mean of the other samples of the prompt.")
    scale_rewards: bool = opt(True, "GRPO: divide by the group's standard deviation (false: Dr. GRPO, Liu et al. 2025).")
    loss_norm: Literal["token", "sequence"] = opt("token", "token: every completion token weighs the same (DAPO); sequence: each completion's token mean, averaged (the GRPO paper).")
    beta: float = opt(0.04, "Coefficient of the k3 KL to the reference in the loss (0: KL only measured).")
    clip_low: float = opt(0.2, "Ratio clipping below 1 (epsilon).")
    clip_high: float = opt(0.2, "Ratio clipping above 1 (DAPO's clip-higher uses 0.28).")
    num_iterations: int = opt(1, "Optimizer updates per rollout batch (GRPO's mu); >1 reuses rollouts, ratios then leave 1.")

    def validate(self) -> None:
        super().validate()
        if self.advantage == "rloo" and self.num_generations < 2:
            raise ConfigError("advantage rloo: needs num_generations >= 2")
        if self.advantage == "grpo" and self.num_generations < 2:
            raise ConfigError("num_generations: GRPO compares completions of a prompt, so it needs >= 2")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations: must be >= 1, got {self.num_iterations}")


@dataclass
class PPOConfig(RLConfig):
    """PPO with a value head on the policy (classic RLHF): GAE, clipped policy and value losses, KL penalty."""

    output_dir: str = opt("runs/ppo", "Where checkpoints, logs, the report and the final adapter/model (+ value head) go.")
    num_generations: int = opt(1, "Completions sampled per prompt.")
    ppo_epochs: int = opt(4, "Passes over each rollout batch.")
    num_minibatches: int = opt(1, "Optimizer updates per pass (grad_accum must be a multiple of it).")
    gamma: float = opt(1.0, "Discount factor.")
    lam: float = opt(0.95, "GAE lambda.")
    clip_range: float = opt(0.2, "Policy ratio clipping epsilon.")
    value_clip_range: float = opt(0.2, "Value clipping range around the rollout's values.")
    value_coef: float = opt(0.1, "Weight of the value loss.")
    kl_coef: float = opt(0.05, "KL coefficient.")
    kl_in: Literal["reward", "loss"] = opt("reward", "reward: per-token penalty -kl_coef (log pi_old - log pi_ref) added to the reward (InstructGPT); loss: k3 KL term in the loss.")
    whiten_rewards: bool = opt(False, "Whiten the sequence scores across the step before adding the KL penalty.")
    whiten_advantages: bool = opt(True, "Whiten the advantages across the step's tokens.")

    def validate(self) -> None:
        super().validate()
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ConfigError("ppo_epochs and num_minibatches: must be >= 1")
        if self.grad_accum % self.num_minibatches:
            raise ConfigError(f"num_minibatches: {self.num_minibatches} must divide grad_accum ({self.grad_accum})")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("gamma and lam: must be in [0, 1]")


@dataclass
class ScoreConfig:
    reward_model: str | None = opt(None, "A reward model from `posttrain rm`: its output directory (a full model, or an adapter) (required).")
    model: str | None = opt(None, "Base model under an adapter reward model; default: the one the adapter was trained on.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    data: str | None = opt(None, "Rows to score: prompt+completion, messages (the last assistant turn is the response), or prompt+chosen+rejected (both scored).")
    prompt: str | None = opt(None, "One prompt to score a response to (with `response`).")
    response: list[str] | str | None = opt(None, "One or more responses to `prompt`.")
    output: str | None = opt(None, "Write the scores as JSONL here (one row per input row) as well as printing them.")
    batch_size: int = opt(16, "Sequences per forward pass.")
    max_length: int = opt(1024, "Longer sequences are truncated (and counted).")


@dataclass
class SamplingSection:
    max_new_tokens: int = opt(256, "Tokens to generate at most.")
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    top_k: int = opt(0, "Sample from the k most likely tokens (0: off).")


@dataclass
class GenerateConfig:
    model: str = opt("smollm2-135m", "Base model: 'smollm2-135m', a local HF directory, or a hub id.")
    adapter: str | None = opt(None, "A PEFT adapter directory to apply.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    prompt: list[str] = opt([], "User prompts (each becomes one chat conversation).")
    prompts_file: str | None = opt(None, "A data file of prompts: `messages` (the last assistant turn is dropped), `prompt`, or `text` rows.")
    system: str | None = opt(None, "System message prepended to every prompt.")
    batch_size: int = opt(8, "Prompts generated together.")
    seed: int = opt(42, "Sampling seed.")
    sampling: SamplingSection = section(SamplingSection, "Sampling settings.")


@dataclass
class MergeConfig:
    model: str = opt("smollm2-135m", "Base model the adapter was trained on.")
    adapter: str | None = opt(None, "LoRA/DoRA adapter directory to merge (required).")
    output_dir: str | None = opt(None, "Where the merged transformers model is written (required).")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    check: bool = opt(True, "Verify that the merged model's logits match the adapter model's.")
    atol: float = opt(1e-3, "Tolerance of the logits check.")


@dataclass
class EvalConfig:
    model: str = opt("smollm2-135m", "Base model.")
    adapter: str | None = opt(None, "A PEFT adapter directory to apply.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    data: str | None = opt(None, "Dataset for loss/perplexity (any SFT format) (required).")
    max_length: int = opt(1024, "Maximum tokens per sequence.")
    batch_size: int = opt(8, "Sequences per batch.")
    loss_on: Literal["completion", "all"] = opt("completion", "Tokens that count towards the loss.")
    skip_invalid: bool = opt(False, "Skip invalid rows instead of stopping.")
    num_samples: int = opt(3, "Also generate answers for this many prompts of the dataset.")
    sampling: SamplingSection = section(SamplingSection, "Sampling settings for the sample generations.")


@dataclass
class ServeSamplingSection:
    max_tokens: int = opt(256, "Tokens generated when a request gives no max_tokens (at most max_tokens_limit).")
    temperature: float = opt(1.0, "Temperature when a request gives none (OpenAI's default is 1); 0 = greedy.")
    top_p: float = opt(1.0, "Nucleus sampling threshold when a request gives none.")


@dataclass
class ServeConfig:
    """`posttrain serve`: an OpenAI-compatible API for a base model and its LoRA adapters."""

    model: str = opt("smollm2-135m", "Base model: 'smollm2-135m' (embedded), a local HF directory, or a hub id.")
    model_name: str | None = opt(None, "Name clients use for the base model (default: the last part of `model`, e.g. smollm2-135m).")
    adapters: dict = opt({}, "LoRA adapters served next to the base, one base model in memory: {name: adapter_dir} or {name: {adapter: dir, version: v}}; clients select one by `model: name`. The version defaults to the directory's name.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Weights' dtype: auto = bfloat16 on GPUs that support it, else float32.")
    host: str = opt("127.0.0.1", "Address to listen on; 0.0.0.0 exposes the server to the network.")
    port: int = opt(8000, "TCP port (0: any free port).")
    auth: bool = opt(True, "Require `Authorization: Bearer <key>`. false (or --no-auth) turns auth off, for local use only.")
    api_key_env: str = opt("POSTTRAIN_API_KEY", "Environment variable holding the accepted API key(s), comma-separated.")
    api_keys: list[str] = opt([], "More accepted API keys (a config file is easy to leak: prefer api_key_env).")
    admin_key_env: str = opt("POSTTRAIN_ADMIN_KEY", "Environment variable holding the admin key(s), comma-separated: the only keys that reach /v1/admin/* (unset: admin routes are off). Must differ from every API key.")
    admin_keys: list[str] = opt([], "More admin keys (prefer admin_key_env).")
    registry: str | None = opt(None, "The loop's registry folder (`posttrain loop`'s registry=): the admin route serves only its versions that passed their gates, and at start-up the server serves its current version as `registry_model`.")
    registry_model: str = opt("assistant", "The served name the loop's registry versions are served under.")
    max_served_names: int = opt(16, "Most model names (adapters) served at once; the admin route cannot add more.")
    db: str = opt("sqlite:///runs/serve/feedback.db", "Where completions and feedback are stored: sqlite:///path or a postgresql:// URL.")
    max_body_bytes: int = opt(1_000_000, "Largest request body accepted; larger ones get 413.")
    max_tokens_limit: int = opt(1024, "Largest max_tokens a request may ask for; more gets 400.")
    max_prompt_tokens: int = opt(4096, "Largest prompt (chat template applied) in tokens; longer gets 400.")
    max_messages: int = opt(256, "Most messages in one request.")
    max_stop_strings: int = opt(4, "Most stop strings in one request (OpenAI allows 4).")
    max_stop_chars: int = opt(256, "Longest stop string in characters.")
    max_comment_chars: int = opt(4000, "Longest feedback comment in characters.")
    feedback_any_key: bool = opt(False, "Accept feedback on a completion made with another API key (off: only the key that made a completion can rate it).")
    allow_control_tokens: bool = opt(False, "Read chat-template control tokens (e.g. <|im_start|>) in message content as control tokens. Off: content is tokenised as plain text, so a user cannot forge a system turn.")
    max_connections: int = opt(256, "Open connections at most; more get 503.")
    timeout_keep_alive_s: int = opt(5, "Seconds an idle keep-alive connection stays open.")
    timeout_header_s: float = opt(10.0, "Seconds a client has to send a request's headers; slower connections are closed.")
    max_queue: int = opt(64, "Requests waiting for the generation worker at most; more get 503 (retry later).")
    batch_size: int = opt(8, "Requests for the same model decoded together at most.")
    seed: int = opt(0, "Seed of the server's sampling generator.")
    sampling: ServeSamplingSection = section(ServeSamplingSection, "Defaults for sampling fields a request leaves out.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = opt("info", "uvicorn's log level.")

    def validate(self) -> None:
        positive = {"max_body_bytes": self.max_body_bytes, "max_tokens_limit": self.max_tokens_limit,
                    "max_prompt_tokens": self.max_prompt_tokens, "max_messages": self.max_messages,
                    "max_queue": self.max_queue, "batch_size": self.batch_size, "sampling.max_tokens": self.sampling.max_tokens,
                    "max_served_names": self.max_served_names, "max_stop_strings": self.max_stop_strings,
                    "max_stop_chars": self.max_stop_chars, "max_comment_chars": self.max_comment_chars,
                    "max_connections": self.max_connections, "timeout_keep_alive_s": self.timeout_keep_alive_s}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be in 0..65535, got {self.port}")
        if not self.timeout_header_s > 0:
            raise ConfigError(f"timeout_header_s: must be > 0, got {self.timeout_header_s}")
        if len(self.adapters) > self.max_served_names:
            raise ConfigError(f"adapters: {len(self.adapters)} adapters, over max_served_names={self.max_served_names}")
        if self.sampling.temperature < 0 or not 0 < self.sampling.top_p <= 1:
            raise ConfigError("sampling: temperature must be >= 0 and top_p in (0, 1]")
        for name, spec in self.adapters.items():
            ok = isinstance(spec, str) or (isinstance(spec, dict) and isinstance(spec.get("adapter"), str)
                                            and set(spec) <= {"adapter", "version"})
            if not ok:
                raise ConfigError(f"adapters.{name}: expected an adapter directory or {{adapter: dir, version: v}}, got {spec!r}")


STAGE_CONFIGS: dict[str, type] = {
    "sft": SFTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "grpo": GRPOConfig,
    "ppo": PPOConfig,
    "score": ScoreConfig,
    "generate": GenerateConfig,
    "chat": GenerateConfig,
    "merge": MergeConfig,
    "eval": EvalConfig,
    "serve": ServeConfig,
}


# --------------------------------------------------------------------------------------------- parsing
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        raise AssertionError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; `posttrain <stage> --help` lists the keys")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section of keys, got {value!r}")
            kwargs[key] = _build(tp, value, dotted + ".")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["lora.r=32", "data.train=x.jsonl"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value, e.g. lora.r=32")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("[", "{")):
            value = raw  # e.g. "a: b" is a string here, not a mapping
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(cls: type, path: str | Path | None, overrides: list[str] | None = None, what: str = "options") -> Any:
    """``cls`` from an optional YAML file of ``what`` plus dotted overrides, unvalidated (for commands whose
    configs are not stages: data clean/synth, loop, rollback)."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of {what}")
    return _build(cls, _merge(values, parse_overrides(overrides or [])))


def load_config(stage: str, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Build and validate the typed config of ``stage`` from a YAML file and dotted overrides."""
    cls = STAGE_CONFIGS[stage]
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        values = loaded or {}
    values = _merge(values, parse_overrides(overrides or []))
    config = _build(cls, values)
    if hasattr(config, "validate"):
        config.validate()
    return config


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def help_table(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, sections expanded."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(help_table(tp, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", "null" if default is None else str(default), f.metadata.get("help", "")))
    return rows


def markdown_reference() -> str:
    """Every command's keys as Markdown tables (the README's reference section is generated from this)."""
    seen: dict[type, list[str]] = {}
    for stage, cls in STAGE_CONFIGS.items():
        seen.setdefault(cls, []).append(stage)
    parts = []
    for cls, stages in seen.items():
        title = " / ".join(f"`posttrain {s}`" for s in stages)
        parts.append(f"#### {title}\n\n| key | default | meaning |\n|---|---|---|")
        for key, default, text in help_table(cls):
            parts.append(f"| `{key}` | `{default}` | {text} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


# `posttrain plan` keeps its config next to its model (plan.py imports this module's helpers, so it registers
# itself here, after everything above is defined).
from posttrain.plan import PlanConfig  # noqa: E402

STAGE_CONFIGS["plan"] = PlanConfig
