"""Tiny random models of every model family posttrain supports, built from transformers configs (no downloads).

Each family keeps what makes it different from Llama (the feature its fast paths must not lose), at 2 layers,
hidden 64, 4 query heads of 16 dims over 2 K/V heads. Sliding windows are 8 tokens, so the test rows (20-40
tokens) are longer than every window and a path that drops the window computes a different function.
"""

from __future__ import annotations

from pathlib import Path

import torch

WINDOW = 8

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              initializer_range=0.2)  # weights large enough that soft-caps and windows change the scores

# family -> (transformers model_type, overrides of COMMON, what the family adds)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("llama", dict(tie_word_embeddings=True), "Llama 3 shapes, tied embeddings"),
    "llama_untied": ("llama", dict(tie_word_embeddings=False), "Llama 3 shapes, untied head"),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False), "q/k/v biases"),
    "qwen3": ("qwen3", dict(tie_word_embeddings=False), "QK-norm"),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
                  "router and 4 experts, top-2"),
    "gemma2": ("gemma2", dict(sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                              query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"]),
               "attention and final-logit soft-capping, alternating windows, query_pre_attn_scalar"),
    "gemma3_text": ("gemma3_text", dict(sliding_window=WINDOW, query_pre_attn_scalar=24,
                                        layer_types=["sliding_attention", "full_attention"]),
                    "local/global layers with their own RoPE bases, (1 + w) norms, QK-norm"),
    "mistral": ("mistral", dict(sliding_window=WINDOW, tie_word_embeddings=False), "sliding window"),
    "phi3": ("phi3", dict(tie_word_embeddings=False), "fused qkv_proj and gate_up_proj"),
    "olmo2": ("olmo2", dict(tie_word_embeddings=False), "norms after attention and MLP, QK-norm"),
    "granite": ("granite", dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.1,
                                logits_scaling=4.0, tie_word_embeddings=True),
                "embedding, residual and attention multipliers, logits scaling"),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0], tie_word_embeddings=True), "NoPE layers"),
    "gpt_oss": ("gpt_oss", dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                                layer_types=["sliding_attention", "full_attention"],
                                rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                                 "original_max_position_embeddings": 128}),
                "attention sinks, alternating windows, 4 experts top-2, YaRN"),
}


def family_config(family: str, tokenizer):
    from transformers import AutoConfig

    model_type, overrides, _ = FAMILIES[family]
    kwargs = {**COMMON, **overrides}
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)


def build_family(family: str, tokenizer, out: Path, seed: int = 0) -> Path:
    """Save a tiny random model of ``family`` with ``tokenizer`` as a Hugging Face directory at ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer), dtype=torch.float32)
    with torch.no_grad():  # zero-initialised parameters would hide a family's feature (sinks, biases)
        for name, param in model.named_parameters():
            if name.endswith(("sinks", "bias")) and param.abs().max() == 0:
                param.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
