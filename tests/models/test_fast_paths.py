"""The step's fast paths give the same numbers as the plain computation they replace.

- merged-weight LoRA linears (models/fused_lora.py) vs PEFT's own forward: outputs and every gradient;
- a frozen head's log-probs with the gradient formed in the forward (models/forward.py) vs the checkpointed
  head and vs cross-entropy on the full logits;
- fused RMSNorm (models/fused_norm.py) vs transformers' Llama RMSNorm: output, input and weight gradients;
- all of them together inside a LoRA model's SFT loss vs the full-logits loss of the same model without them,
  and inside a fully fine-tuned model (norm weights trained).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from posttrain.data.batching import collate_sft
from posttrain.data.tokenize import TokenizedExample
from posttrain.losses import causal_lm_loss, sft_loss
from posttrain.models import forward as fw
from posttrain.models import fused_lora, fused_norm
from posttrain.models.forward import head_logps, target_logps


def _lora_mlp(dropout: float = 0.0, bias: str = "none", dora: bool = False):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.GELU(), torch.nn.Linear(80, 48, bias=False))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, bias=bias, use_dora=dora,
                                            target_modules=["0", "2"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a trained adapter has not
            torch.nn.init.normal_(p, std=0.2)
    return model


def _run(model, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(grad_out)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_merged_lora_equals_peft_forward_and_gradients(bias, monkeypatch):
    plain = _lora_mlp(bias=bias)
    fused = copy.deepcopy(plain)
    assert fused_lora.enable(fused) == 2
    calls = []
    original = fused_lora._MergedLoRALinear.apply
    monkeypatch.setattr(fused_lora._MergedLoRALinear, "apply", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(3, 50, 48)  # 150 tokens >= 32 x r
    g = torch.randn(3, 50, 48)
    y0, dx0, grads0 = _run(plain, x, g)
    y1, dx1, grads1 = _run(fused, x, g)
    assert len(calls) == 2, "the merged path did not run"
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-5)
    assert grads0.keys() == grads1.keys() and len(grads0) == (4 if bias == "none" else 5)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", ["short", "bf16", "dropout", "dora", "disabled"])
def test_merged_lora_steps_aside_where_it_would_not_be_exact_or_cheaper(case, monkeypatch):
    model = _lora_mlp(dropout=0.1 if case == "dropout" else 0.0, dora=case == "dora")
    reference = copy.deepcopy(model)
    fused_lora.enable(model)
    monkeypatch.setattr(fused_lora._MergedLoRALinear, "apply",
                        lambda *a: pytest.fail("the merged path ran where PEFT's forward must"))
    x = torch.randn(2, 4 if case == "short" else 100, 48)
    if case == "bf16":  # merging into a bf16 weight would round a small update away
        model, reference, x = model.to(torch.bfloat16), reference.to(torch.bfloat16), x.to(torch.bfloat16)
    model.eval(), reference.eval()  # dropout off for the comparison; the dropout module still is not Identity
    if case == "disabled":
        with model.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(model(x), reference(x))
    else:
        torch.testing.assert_close(model(x), reference(x))


MAPS = {"identity": fw.IDENTITY, "granite": fw.LogitMap(divisor=4.0), "gemma": fw.LogitMap(softcap=3.0)}


@pytest.mark.parametrize("logit_map", list(MAPS))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk,block_rows", [(1, 128), (5, 128), (1024, 128), (1024, 4), (10, 3)])
def test_frozen_head_logps_and_gradients_equal_the_checkpointed_head(temperature, chunk, block_rows, logit_map,
                                                                     monkeypatch):
    """Chunks and the row blocks inside a frozen head's chunk (several, the last one partial) change nothing; a
    family's logit map (Granite's divisor, Gemma's soft-cap) gives the logps and gradients of the formula."""
    logit_map = MAPS[logit_map]
    monkeypatch.setattr(fw, "_HEAD_BLOCK_ROWS", block_rows)
    torch.manual_seed(1)
    head = torch.nn.Linear(32, 300).requires_grad_(False)
    hidden = (3 * torch.randn(23, 32)).requires_grad_()  # logits of a few units: the soft-cap bends them
    targets = torch.randint(0, 300, (23,))
    weights = torch.randn(23)
    results = []
    for frozen in (False, True):
        monkeypatch.setattr(fw, "_frozen_linear", lambda h, f=frozen: f)
        logps = head_logps(head, hidden, targets, chunk, temperature, logit_map)
        (grad,) = torch.autograd.grad((logps * weights).sum(), hidden)
        results.append((logps.detach(), grad))
    logits = head(hidden).float() / logit_map.divisor
    if logit_map.softcap:
        logits = logit_map.softcap * torch.tanh(logits / logit_map.softcap)
    expected = torch.log_softmax(logits / temperature, -1).gather(1, targets[:, None]).squeeze(1)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), hidden)
    torch.testing.assert_close(results[1][0], expected.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows_cap", [256, 7])
def test_trained_head_chunks_equal_the_full_logits(rows_cap, monkeypatch):
    """A trained head is checkpointed in chunks of at most _TRAINED_HEAD_CHUNK_ROWS rows: logps and the hidden,
    weight and bias gradients equal the full-logits computation (several chunks, the last partial)."""
    monkeypatch.setattr(fw, "_TRAINED_HEAD_CHUNK_ROWS", rows_cap)
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 50, (40,))
    weights = torch.randn(40)
    logps = head_logps(head, hidden, targets, chunk_size=1024)
    grads = torch.autograd.grad((logps * weights).sum(), [hidden, head.weight, head.bias])
    full = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    expected = torch.autograd.grad((full * weights).sum(), [hidden, head.weight, head.bias])
    torch.testing.assert_close(logps, full, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_frozen_head_gradient_in_bf16_is_as_accurate_as_the_checkpointed_one(monkeypatch):
    """A confident prediction: the gradient W[t] - p W is a small difference of large vectors. Forming
    (p - onehot) in fp32 before the bf16 matmul keeps the error at the level of the usual backward's."""
    torch.manual_seed(2)
    weight = torch.randn(200, 16)
    hidden = (weight[7] * 4).expand(6, 16).clone() + 0.1 * torch.randn(6, 16)  # strongly predicts token 7
    targets = torch.full((6,), 7)

    def grad(dtype, frozen):
        monkeypatch.setattr(fw, "_frozen_linear", lambda h: frozen)
        head = torch.nn.Linear(16, 200, bias=False).to(dtype).requires_grad_(False)
        head.weight.data.copy_(weight)
        h = hidden.to(dtype).requires_grad_()
        return torch.autograd.grad(head_logps(head, h, targets).sum(), h)[0].float()

    truth = grad(torch.float32, False)
    err = {frozen: ((grad(torch.bfloat16, frozen) - truth).norm() / truth.norm()).item() for frozen in (False, True)}
    assert err[True] <= 1.5 * err[False] + 1e-3, err


def _examples(n: int, seed: int) -> list[TokenizedExample]:
    rng = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(20, 60, (1,), generator=rng))
        ids = torch.randint(5, 1000, (length,), generator=rng).tolist()
        split = length // 3
        out.append(TokenizedExample(input_ids=ids, loss_mask=[0] * split + [1] * (length - split)))
    return out


def test_lora_sft_loss_and_gradients_with_both_fast_paths_equal_full_logits(tiny_model_dir, monkeypatch):
    """The whole lean path of a LoRA model (merged linears + frozen-head gradient) vs PEFT's forward with the
    full (B, T, V) logits and plain cross-entropy."""
    monkeypatch.setattr(fused_lora, "MIN_TOKENS_PER_RANK", 1)
    batch = collate_sft(_examples(5, seed=3), pad_id=0)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    lean = copy.deepcopy(plain)
    assert fused_lora.enable(lean) > 0
    assert fused_norm.enable(lean) == 5  # 2 per layer and the final norm
    loss0, _ = causal_lm_loss(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
    loss1, _ = sft_loss(target_logps(lean, batch, chunk_size=16)[0])
    loss0.backward()
    loss1.backward()
    torch.testing.assert_close(loss1.detach(), loss0.detach(), rtol=1e-5, atol=1e-5)
    grads0 = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    grads1 = {n: p.grad for n, p in lean.named_parameters() if p.requires_grad}
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name, g in grads0.items():
        rel = (grads1[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"


def test_merged_qlora_equals_peft_4bit_forward_and_gradients(monkeypatch):
    """QLoRA: the 4-bit weight is dequantized for the merge; outputs and adapter gradients match PEFT's
    bitsandbytes path (fp32 compute, as on CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig  # noqa: F401  (bitsandbytes is usable from transformers)

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    quantized = torch.nn.Sequential(
        bnb.nn.Linear4bit(64, 128, compute_dtype=torch.float32, quant_type="nf4"), torch.nn.GELU(),
        bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4"))
    for q, dense in ((quantized[0], base[0]), (quantized[2], base[2])):
        q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        q.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    quantized = quantized.to("cpu")  # quantizes the weights
    plain = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    fused = copy.deepcopy(plain)
    assert fused_lora.enable(fused) == 2
    calls = []
    original = fused_lora._MergedLoRALinear.apply
    monkeypatch.setattr(fused_lora._MergedLoRALinear, "apply", lambda *a: calls.append(1) or original(*a))
    x, g = torch.randn(2, 80, 64), torch.randn(2, 80, 64)
    y0, dx0, grads0 = _run(plain, x, g)
    y1, dx1, grads1 = _run(fused, x, g)
    assert len(calls) == 2, "the merged path did not run"
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-5)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-4)


def _llama_norm(size: int = 40):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    norm = LlamaRMSNorm(size, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)  # a trained norm's weight is not all ones
    return norm


@pytest.mark.parametrize("weight_trains", [False, True])
def test_fused_rms_norm_equals_llama_rms_norm(weight_trains):
    plain = _llama_norm()
    plain.weight.requires_grad_(weight_trains)
    fused = copy.deepcopy(plain)
    assert fused_norm.enable(fused) == 1
    x = torch.randn(3, 7, 40) * 3 + 1  # a residual stream is neither centred nor unit-scaled
    x[0, 0] = 1e-3  # a near-zero row: r is dominated by eps
    g = torch.randn(3, 7, 40)
    y0, dx0, grads0 = _run(plain, x, g)
    y1, dx1, grads1 = _run(fused, x, g)
    assert torch.equal(y1, y0)  # bit-identical forward: trained and reloaded models give the same logits
    torch.testing.assert_close(dx1, dx0, rtol=1e-4, atol=1e-5)
    assert grads0.keys() == grads1.keys() == ({"weight"} if weight_trains else set())
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-5)


def test_fused_rms_norm_gradient_matches_finite_differences():
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: fused_norm.rms_norm(x, w, 1e-5), (x, w))


def test_fused_rms_norm_steps_aside_for_other_norm_forms(monkeypatch):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    assert fused_norm.enable(GemmaRMSNorm(8)) == 0  # (1 + weight): a different function
    olmo = Olmo2RMSNorm(40).to(torch.bfloat16)  # same fp32 function, rounded after the weight product in bf16
    assert fused_norm.enable(olmo) == 1
    calls = []
    original = fused_norm._RMSNormHalf.apply
    monkeypatch.setattr(fused_norm._RMSNormHalf, "apply", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(4, 40, dtype=torch.bfloat16, requires_grad=True)
    assert torch.equal(olmo(x), type(olmo).forward(olmo, x)) and not calls


@pytest.mark.parametrize("weight_dtype,weight_trains", [(torch.bfloat16, False), (torch.float32, True),
                                                        (torch.bfloat16, True)])
def test_fused_rms_norm_of_bf16_input_equals_llama_rms_norm(weight_dtype, weight_trains):
    """A bf16 residual stream (a bf16 base under autocast; full FT's fp32 weight too): forward bit-identical
    to transformers' module (output dtype included), input and weight gradients within one bf16 rounding."""
    plain = _llama_norm().to(weight_dtype)
    plain.weight.requires_grad_(weight_trains)
    fused = copy.deepcopy(plain)
    assert fused_norm.enable(fused) == 1
    x = (torch.randn(3, 7, 40) * 3 + 1).to(torch.bfloat16)
    x[0, 0] = 1e-3
    y_plain = plain(x)
    g = torch.randn(y_plain.shape).to(y_plain.dtype)
    y0, dx0, grads0 = _run(plain, x, g)
    y1, dx1, grads1 = _run(fused, x, g)
    assert y1.dtype == y0.dtype and torch.equal(y1, y0)
    assert dx1.dtype == torch.bfloat16
    torch.testing.assert_close(dx1, dx0, rtol=1e-2, atol=1e-2)
    assert grads0.keys() == grads1.keys() == ({"weight"} if weight_trains else set())
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-2, atol=1e-2)


def test_norms_routed_for_bf16_round_like_llama():
    """The bf16 path reproduces Llama's rounding points; every class it serves must have Llama's forward."""
    import importlib
    import inspect

    families = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "MixtralRMSNorm": "mixtral",
                "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3", "Qwen2MoeRMSNorm": "qwen2_moe",
                "Qwen3MoeRMSNorm": "qwen3_moe", "Phi3RMSNorm": "phi3", "GraniteRMSNorm": "granite",
                "SmolLM3RMSNorm": "smollm3"}
    assert set(families) == fused_norm._HALF_ROUNDS_LIKE_LLAMA

    def body(name):
        module = importlib.import_module(f"transformers.models.{families[name]}.modeling_{families[name]}")
        return [line.strip() for line in inspect.getsource(getattr(module, name).forward).splitlines()[1:]
                if line.strip()]

    for name in families:
        assert body(name) == body("LlamaRMSNorm"), name


def test_full_finetune_gradients_with_fused_norms_equal_plain(tiny_model_dir):
    """Full fine-tuning trains the norm weights: every parameter's gradient through the fused norms equals the
    eager model's."""
    batch = collate_sft(_examples(3, seed=5), pad_id=0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    fused = copy.deepcopy(plain)
    assert fused_norm.enable(fused) == 5
    for model in (plain, fused):
        loss, _ = sft_loss(target_logps(model, batch, chunk_size=16)[0])
        loss.backward()
    for (name, p0), (_, p1) in zip(plain.named_parameters(), fused.named_parameters()):
        rel = (p1.grad - p0.grad).norm() / p0.grad.norm().clamp_min(1e-12)
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"


def _tiny_adapter_model(tiny_model_dir, method: str, mixed_precision: str, compute_dtype: str = "auto",
                        lora_b_std: float = 0.0):
    """The tiny Llama with ``method`` as the engine builds it; ``lora_b_std`` > 0 draws lora_B (zero at init, which
    would hide the adapter branch and its input gradient)."""
    from posttrain.commands.sft import SFTConfig
    from posttrain.models import adapters

    cfg = SFTConfig(model=str(tiny_model_dir), method=method, attn_implementation="sdpa")
    cfg.qlora.compute_dtype = compute_dtype
    torch.manual_seed(0)
    model, _ = adapters.build_model(cfg, mixed_precision=mixed_precision)
    if lora_b_std:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=lora_b_std)
    return model


def test_qlora_training_after_an_inference_forward_keeps_the_4bit_base(tiny_model_dir):
    """bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel (AVX512-BF16 CPUs, eval mode, no
    gradients: a rollout or an evaluation), a layout dequantize_4bit misreads. A training forward after such a
    forward (the merged LoRA path) must still compute with the right base: the same logits as before it. On this
    project's AVX512-BF16 machine this failed (logits 0.1+ off) until models.loading.keep_4bit_layout."""
    pytest.importorskip("bitsandbytes")
    model = _tiny_adapter_model(tiny_model_dir, "qlora", "no", compute_dtype="float32", lora_b_std=0.05)
    ids = torch.randint(100, 5000, (1, 600))  # long enough for the merged path
    model.train()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:, :5])  # an inference forward: where bitsandbytes would repack
    model.train()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert not any(getattr(getattr(m, "weight", None), "quant_state", None) is not None
                   and getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules())


def _bf16_autocast_step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and fp32 gradients of one SFT forward+backward under CPU bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = sft_loss(target_logps(model, batch)[0])
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(ours, reference, loss_tol: float, grad_rel_tol: float) -> None:
    (loss, grads), (ref_loss, ref_grads) = ours, reference
    torch.testing.assert_close(loss, ref_loss, rtol=loss_tol, atol=loss_tol)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in ref_grads.items():
        rel = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < grad_rel_tol, f"{name}: relative gradient difference {rel:.4f}"


def test_qlora_under_bf16_keeps_unquantized_weights_in_bf16_and_the_same_loss(tiny_model_dir, monkeypatch):
    """QLoRA with bf16 compute (a GPU's default): embedding, norms and head stay bf16 like a LoRA base, not in
    peft's fp32 upcast; the 4-bit linears stay 4-bit, the adapters fp32, and the loss and adapter gradients
    match the fp32-upcast model's to bf16 precision."""
    from posttrain.models import adapters

    batch = collate_sft(_examples(4, seed=3), pad_id=0)
    results = []
    for store in (True, False):
        if not store:
            monkeypatch.setattr(adapters, "store_unquantized_in", lambda model, dtype: None)
        model = _tiny_adapter_model(tiny_model_dir, "qlora", "bf16", compute_dtype="bfloat16")
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        if store:
            assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.bfloat16
            assert all(d == torch.bfloat16 for n, d in dtypes.items() if "norm" in n)
            assert all(d == torch.uint8 for n, d in dtypes.items() if "base_layer" in n)  # NF4, packed
            assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
        else:
            assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32
        results.append(_bf16_autocast_step(model, batch))
    _assert_same_step(results[0], results[1], loss_tol=1e-2, grad_rel_tol=0.05)


def test_lora_input_casts_off_under_autocast_changes_no_value(tiny_model_dir, monkeypatch):
    """bf16 base, fp32 LoRA, CPU autocast, PEFT's own forward (where the low-rank-add path does not apply, e.g.
    with adapter dropout): skipping PEFT's fp32 cast of each adapted linear's input (autocast casts it straight
    back) gives the same loss and gradients, bit for bit, with fewer saved tensors; outside autocast the casts
    stay (an fp32 adapter cannot take a bf16 input)."""
    monkeypatch.setattr(fused_lora, "enable", lambda model: 0)
    model = _tiny_adapter_model(tiny_model_dir, "lora", "bf16", lora_b_std=0.02)
    batch = collate_sft(_examples(4, seed=5), pad_id=0)
    results = []
    for casts_off in (True, False):
        saved = {}  # distinct storages autograd keeps
        original = fw.lora_input_casts_off
        ctx = original if casts_off else (lambda m: contextlib.nullcontext())
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fw, "lora_input_casts_off", ctx)
            model.zero_grad()
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t, saved=saved: saved.__setitem__(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) or t,
                    lambda t: t):
                loss, grads = _bf16_autocast_step(model, batch)
        results.append((loss, grads, sum(saved.values())))
    (loss_off, grads_off, saved_off), (loss_on, grads_on, saved_on) = results
    assert torch.equal(loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys() and grads_off
    for name, g in grads_on.items():
        assert torch.equal(grads_off[name], g), name
    assert saved_off < saved_on
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())  # restored afterwards


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_low_rank_add_under_autocast_matches_peft(tiny_model_dir, method, monkeypatch):
    """bf16 under autocast: the LoRA branch added inside one addmm (scaling on the (out x r) weight) gives PEFT's
    loss and gradients to bf16 precision; outside autocast PEFT's own forward runs."""
    batch = collate_sft(_examples(4, seed=9), pad_id=0)
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(fused_lora, "enable", lambda model: 0)
        model = _tiny_adapter_model(tiny_model_dir, method, "bf16", compute_dtype="bfloat16", lora_b_std=0.05)
        calls = []
        monkeypatch.setattr(fused_lora, "_low_rank_add", lambda *a, f=fused_lora._low_rank_add, calls=calls: calls.append(1) or f(*a))
        results.append(_bf16_autocast_step(model, batch))
        assert (len(calls) == 2 * 7) == fast  # 2 layers x 7 adapted linears
    _assert_same_step(results[0], results[1], loss_tol=2e-3, grad_rel_tol=2e-2)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fp32_base_under_bf16_autocast_trains_long_inputs(tiny_model_dir, method, monkeypatch):
    """An fp32 base under CPU bf16 autocast (QLoRA's fp32 compute under a CPU's bf16 autocast): long inputs
    once took the merged fp32 path, whose autocast-bf16 output met its fp32 backward and crashed (caught by the
    benchmark's 8 x 512 QLoRA run on an AVX512-BF16 CPU). They take the low-rank add now, with PEFT's loss and
    gradients to bf16 precision."""
    torch.manual_seed(1)
    ids = torch.randint(100, 1000, (2, 320))  # 640 tokens: over the merged path's 32 x r threshold
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(fused_lora, "enable", lambda model: 0)
        model = _tiny_adapter_model(tiny_model_dir, method, "no", lora_b_std=0.05)  # fp32 base and compute
        results.append(_bf16_autocast_step(model, batch))
    _assert_same_step(results[0], results[1], loss_tol=2e-3, grad_rel_tol=2e-2)


def test_qlora_compute_dtype_auto_follows_the_runs_precision():
    from posttrain.models.adapters import _compute_dtype

    assert _compute_dtype("auto", "bf16") == torch.bfloat16  # a GPU, or a CPU with native bf16
    assert _compute_dtype("auto", "fp16") == torch.float16
    assert _compute_dtype("auto", "no") == torch.float32
    assert _compute_dtype("float32", "bf16") == torch.float32  # an explicit choice wins
