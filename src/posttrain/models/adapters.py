"""How parameters are updated: full fine-tuning or a PEFT method, behind one small module.

Stages call :func:`build_model` and never branch on the method themselves. Every adapter is a PEFT
adapter, so the output directory is one that plain ``peft.PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from posttrain.errors import ConfigError, PosttrainError
from posttrain.methods import ADAPTER_METHODS
from posttrain.models.loading import load_causal_lm, resolve_model

if TYPE_CHECKING:
    from posttrain.commands.base import TrainConfig



@dataclass
class ParamReport:
    trainable: int
    total: int
    output_bytes: int
    method: str
    attention: str | None = None  # how the family's attention is computed, when there is more to say than plain

    def summary(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        what = "adapter" if self.method in ADAPTER_METHODS else "full model"
        line = (
            f"method {self.method}: {self.trainable:,} trainable of {self.total:,} parameters ({pct:.3f}%); "
            f"the saved {what} will take about {_human_bytes(self.output_bytes)} on disk"
        )
        return line if self.attention is None else f"{line}\n{self.attention}"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def _compute_dtype(name: str, mixed_precision: str = "no") -> torch.dtype:
    """QLoRA's 4-bit matmul dtype. ``auto`` follows the run's precision: under bf16 (fp16) autocast, on a GPU or
    a CPU with native bf16, the matmuls run in it too (faster than fp32 dequantization under the same autocast:
    docs/benchmarks.md, "Measurements behind the code")."""
    if name == "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def expert_parameters(model: torch.nn.Module) -> list[str]:
    """Names of an MoE model's stacked expert projections: its 3-D floating parameters, (experts, ., .) each
    (Qwen3-MoE's and gpt-oss's ``mlp.experts.gate_up_proj`` / ``down_proj``), as PEFT's ``target_parameters``
    suffixes. Empty for a dense model."""
    names = set()
    for name, param in model.named_parameters():
        if param.ndim == 3 and param.is_floating_point():
            names.add(".".join(name.split(".")[-3:]))  # mlp.experts.gate_up_proj
    return sorted(names)


def lora_targets(model: torch.nn.Module, target_modules: list[str] | str, experts: bool) -> tuple[list[str] | str, list[str]]:
    """(target_modules, target_parameters) for PEFT.

    A dense model keeps ``target_modules`` as given. An MoE model's ``all-linear`` is resolved here to the leaf
    names of its linear layers but the output and score heads: PEFT would otherwise map it, for checkpoints of
    transformers 4 when experts and routers were linear layers, onto the experts and the router too (Qwen3-MoE),
    and a trained router changes which experts every token uses. The experts join only with ``experts``."""
    expert_params = expert_parameters(model)
    if experts and not expert_params:
        raise ConfigError("lora.target_experts: the model has no experts (it is not a mixture-of-experts model)")
    if not expert_params or target_modules != "all-linear":
        return target_modules, expert_params if experts else []
    heads = {id(model.get_output_embeddings()), id(getattr(model, "score", None))}
    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and id(module) not in heads})
    return names, expert_params if experts else []


def _lora_config(cfg: TrainConfig, model: torch.nn.Module, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    if cfg.lora.dora and cfg.lora.target_experts:
        raise ConfigError("lora.target_experts: PEFT cannot apply DoRA to expert parameters; set lora.dora=false, "
                          "or lora.target_experts=false to adapt the attention only")
    modules, parameters = lora_targets(model, cfg.lora.target_modules, cfg.lora.target_experts)
    return LoraConfig(
        task_type=task_type,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=modules,
        target_parameters=parameters or None,
        use_dora=cfg.lora.dora,
    )


def _peft_config(cfg: TrainConfig, model: torch.nn.Module, task_type: str = "CAUSAL_LM"):
    """PEFT config of ``cfg.method``; task_type SEQ_CLS (reward models) also trains and saves the score head."""
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit

    if cfg.method in ("lora", "qlora"):
        return _lora_config(cfg, model, task_type)
    if cfg.method == "prompt":
        if cfg.prompt.init_text:
            return PromptTuningConfig(
                task_type=task_type,
                num_virtual_tokens=cfg.prompt.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=cfg.prompt.init_text,
                tokenizer_name_or_path=resolve_model(cfg.model),
            )
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.prompt.num_virtual_tokens)
    if cfg.method == "prefix":
        return PrefixTuningConfig(
            task_type=task_type,
            num_virtual_tokens=cfg.prefix.num_virtual_tokens,
            prefix_projection=cfg.prefix.projection,
        )
    raise AssertionError(cfg.method)


def frozen_storage_dtype(method: str, mixed_precision: str) -> torch.dtype:
    """dtype the frozen base weights are stored in.

    Under bf16/fp16 mixed precision, frozen weights of adapter methods are stored in half precision: autocast
    would cast fp32 weights to half in every forward anyway, so storing them in half saves that cast and half
    their memory. Trainable weights and the optimizer state stay fp32. Full fine-tuning keeps fp32 master weights.
    """
    if method in ("lora", "prompt", "prefix"):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return torch.float32


def _load_base(cfg: TrainConfig, device: torch.device | None, mixed_precision: str, task: str = "causal_lm"):
    attn = cfg.attn_implementation
    if cfg.method != "qlora":
        dtype = frozen_storage_dtype(cfg.method, mixed_precision)
        return load_causal_lm(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code, attn_implementation=attn,
                              task=task)
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise PosttrainError("method qlora needs bitsandbytes: pip install bitsandbytes") from e
    compute = _compute_dtype(cfg.qlora.compute_dtype, mixed_precision)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.qlora.quant_type,
        bnb_4bit_use_double_quant=cfg.qlora.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=["score"] if task == "seq_cls" else None,  # the reward head stays a full-precision Linear
    )
    model = load_causal_lm(
        cfg.model,
        dtype=compute,
        trust_remote_code=cfg.trust_remote_code,
        quantization_config=bnb,
        device_map={"": device if device is not None else "cpu"},
        attn_implementation=attn,
        task=task,
    )
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if compute != torch.float32 and compute == frozen_storage_dtype("lora", mixed_precision):
        store_unquantized_in(model, compute)
    return model


def store_unquantized_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """QLoRA under half-precision autocast: the frozen weights that stay unquantized (embedding, norms, head)
    are stored in the compute dtype, as a LoRA base is (:func:`frozen_storage_dtype`), not in the fp32 that
    ``peft.prepare_model_for_kbit_training`` upcasts them to. fp32 would double their memory (the tied
    embedding is a fifth of SmolLM2-135M), make the residual stream fp32 so that autocast keeps a bf16 copy of
    the input of every linear, and cast the head for every loss chunk. TRL 1.16 leaves them in bf16 too (H100:
    106 MB of frozen weights against posttrain's 160 MB before this)."""
    for param in model.parameters():
        if param.is_floating_point() and not param.requires_grad and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)


def build_model(
    cfg: TrainConfig, device: torch.device | None = None, mixed_precision: str = "no", task: str = "causal_lm",
    pad_token_id: int | None = None,
) -> tuple[torch.nn.Module, ParamReport]:
    """Load the base model and apply ``cfg.method`` (and ``cfg.adapter`` to start from).

    ``task="seq_cls"`` builds a reward model: the backbone with a one-output ``score`` head (randomly
    initialised, always trained, saved with the adapter). ``pad_token_id`` goes into its config, which is how
    transformers finds the last real token to read the score at.
    """
    from peft import PeftConfig, PeftModel, get_peft_model

    model = _load_base(cfg, device, mixed_precision, task)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if cfg.adapter:
        if not (Path(cfg.adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"adapter: '{cfg.adapter}' is not a PEFT adapter directory (no adapter_config.json)")
        if cfg.method == "full":
            # Full fine-tuning from an adapter: fold it into the weights first.
            model = PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
        else:
            kind = PeftConfig.from_pretrained(cfg.adapter).peft_type.value.lower()
            expected = {"lora": "lora", "qlora": "lora", "prompt": "prompt_tuning", "prefix": "prefix_tuning"}[cfg.method]
            if kind != expected:
                raise ConfigError(
                    f"adapter: '{cfg.adapter}' is a {kind} adapter but method is {cfg.method}; "
                    "set method to match it, or method=full to merge it and fine-tune all weights"
                )
            model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
    elif cfg.method in ADAPTER_METHODS:
        model = get_peft_model(model, _peft_config(cfg, model, "SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM"))

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable weights (and so AdamW state) are fp32 whatever the base dtype
    from posttrain.models import fused_mlp, fused_norm

    fused_norm.enable(model)  # RMSNorm as one autograd node in fp32 (fewer passes, no normalised copy kept)
    fused_mlp.enable(model)  # silu(gate) * up as one node on a CPU in fp32 (AVX2 kernel; silu(gate) not kept)
    if cfg.method in ("lora", "qlora"):
        from posttrain.models import fused_lora

        fused_lora.enable(model)  # merged-weight LoRA linears where that is exact and cheaper (fp32, long inputs)
    if cfg.gradient_checkpointing and cfg.method != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    from posttrain.models import attention

    report = param_report(model, cfg.method)
    report.attention = attention.describe(model.config, model.config._attn_implementation)
    return model, report


def param_report(model: torch.nn.Module, method: str) -> ParamReport:
    trainable = total = 0
    trainable_bytes = 0
    for p in model.parameters():  # parameters() yields tied weights once
        n = p.numel()
        # bitsandbytes Params4bit pack two 4-bit values per uint8 element
        if p.dtype == torch.uint8 and hasattr(p, "quant_state"):
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
            trainable_bytes += n * p.element_size()
    if method in ADAPTER_METHODS:
        output_bytes = trainable_bytes
    else:
        output_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return ParamReport(trainable=trainable, total=total, output_bytes=output_bytes, method=method)


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def disable_adapter(model: torch.nn.Module) -> Iterator[None]:
    """Run the frozen base model: the reference pass of preference and RL stages, no second copy."""
    if is_peft(model):
        with model.disable_adapter():
            yield
    else:
        yield


def load_for_inference(model_spec: str, adapter: str | None, trust_remote_code: bool = False):
    """Base model plus an optional PEFT adapter, in eval mode (generate / chat / eval / merge)."""
    from peft import PeftModel

    model = load_causal_lm(model_spec, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"adapter: '{adapter}' is not a PEFT adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model


def load_model_and_tokenizer(model_spec: str, adapter: str | None, trust_remote_code: bool = False):
    """(model, tokenizer) for inference: :func:`load_for_inference` and the base model's tokenizer."""
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
    return load_for_inference(model_spec, adapter, trust_remote_code), tokenizer
