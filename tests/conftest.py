"""Shared fixtures: the embedded tokenizer and tiny random Llama models built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One cache per test session machine; the GGUF conversion happens once (~30 s), then loads take seconds.
os.environ.setdefault("POSTTRAIN_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "posttrain"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (ChatML template)."""
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the embedded tokenizer, saved as a HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama that vLLM's CPU attention accepts (head_dim 64; it refuses tiny_model_dir's 16), with the
    embedded tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama-vllm")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tokenizer):
    """family -> a tiny random model of it (tests/families.py) with the embedded tokenizer, built once."""
    from tests.families import build_family

    built = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family(family, tokenizer, tmp_path_factory.mktemp(family))
        return built[family]

    return get
