"""CUDA-only checks (skipped without a GPU; benchmarks/gpu.sh runs them): the flash-attention varlen packing
path and bf16 storage must not change the loss."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from posttrain.data.batching import collate_packed, collate_sft, pack_examples
from posttrain.losses import sft_loss
from posttrain.models.forward import target_logps
from tests.data.test_packing_and_lean_loss import random_examples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_varlen_packed_loss_equals_unpacked(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    examples = random_examples(9, seed=2)
    unpacked = {k: v.cuda() for k, v in collate_sft(examples, pad_id=0).items()}
    packed = {k: v.cuda() for k, v in collate_packed(pack_examples(examples, 64), pad_id=0).items()}
    with torch.no_grad():
        a, _ = sft_loss(target_logps(model, unpacked)[0])
        b, _ = sft_loss(target_logps(model, packed)[0])
    torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2)  # bf16 kernels


def test_sdpa_packed_loss_equals_unpacked_on_cuda(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").cuda().eval()
    examples = random_examples(9, seed=2)
    unpacked = {k: v.cuda() for k, v in collate_sft(examples, pad_id=0).items()}
    packed = {k: v.cuda() for k, v in collate_packed(pack_examples(examples, 64), pad_id=0).items()}
    with torch.no_grad():
        a, _ = sft_loss(target_logps(model, unpacked)[0])
        b, _ = sft_loss(target_logps(model, packed)[0])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
