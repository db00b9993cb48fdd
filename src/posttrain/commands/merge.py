"""``posttrain merge``: fold a LoRA/DoRA adapter into its base model, checking the logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain.config import opt
from posttrain.errors import ConfigError, PosttrainError

HELP = "Merge a LoRA/DoRA adapter into its base model and save a full transformers model."
EXAMPLES = "posttrain merge adapter=runs/sft output_dir=runs/sft-merged"


@dataclass
class MergeConfig:
    model: str = opt("smollm2-135m", "Base model the adapter was trained on.")
    adapter: str | None = opt(None, "LoRA/DoRA adapter directory to merge (required).")
    output_dir: str | None = opt(None, "Where the merged transformers model is written (required).")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    check: bool = opt(True, "Verify that the merged model's logits match the adapter model's.")
    atol: float = opt(1e-3, "Tolerance of the logits check.")


Config = MergeConfig


def run(cfg: MergeConfig) -> Path:
    import torch
    from peft import PeftConfig

    from posttrain.models.adapters import load_model_and_tokenizer

    if not cfg.adapter or not cfg.output_dir:
        raise ConfigError("merge needs adapter=<adapter dir> and output_dir=<where to write the merged model>")
    kind = PeftConfig.from_pretrained(cfg.adapter).peft_type.value
    if kind != "LORA":
        raise ConfigError(f"adapter: merge needs a LoRA/DoRA adapter; '{cfg.adapter}' is {kind} (it adds tokens, there is nothing to fold into the weights)")
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.adapter, cfg.trust_remote_code)
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Check that merging keeps the logits: the quick brown fox."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        before = model(**probe).logits
        merged = model.merge_and_unload()
        after = merged(**probe).logits
    diff = float((before - after).abs().max())
    print(f"max |logit difference| adapter vs merged: {diff:.2e}")
    if cfg.check and diff > cfg.atol:
        raise PosttrainError(f"merged logits differ from the adapter model's by {diff:.3e} > atol {cfg.atol}; not saving")
    out = Path(cfg.output_dir)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"merged model saved to {out}")
    return out
