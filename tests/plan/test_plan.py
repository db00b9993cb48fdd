"""posttrain plan: its math against hand-computed numbers, its activation count against what autograd really
saves, its fit table against published figures, and (slow) its peaks against measured training runs."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.commands.plan import PlanConfig
from posttrain.commands.plan import run as run_plan
from posttrain.errors import ConfigError
from posttrain.plan import memory, report, shapes
from posttrain.plan.memory import estimate
from posttrain.plan.shapes import KNOWN_SHAPES, GiB, ModelShape
from tests.families import FAMILIES

# h=8, f=16, 2 layers, 2 heads of 4 dims sharing 1 KV head, vocab 10, tied embeddings.
TINY = ModelShape("tiny", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=4, tie_embeddings=True, source="test")
ADAPTERS = dict(lora_r=2, lora_targets="all-linear", num_virtual_tokens=3)


# --------------------------------------------------------------------------------------------- hand-computed
def test_parameter_counts_by_hand():
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate 8x16 + up 8x16 + down 16x8 = 576; x 2 layers
    assert TINY.linear_params == 1152
    # + tied embedding 10x8 + norms (2 per layer + final) x 8
    assert TINY.num_params == 1152 + 80 + 40
    # LoRA r=2 adds r*(in+out) per linear: q 32, k 24, v 24, o 32, gate 48, up 48, down 48 = 256 per layer
    assert memory.trainable_params(TINY, "lora", **ADAPTERS) == 512
    assert memory.trainable_params(TINY, "prompt", **ADAPTERS) == 3 * 8  # virtual tokens x h
    assert memory.trainable_params(TINY, "prefix", **ADAPTERS) == 3 * 2 * 2 * 4  # tokens x layers x (k, v) x kv dim
    assert memory.trainable_params(TINY, "lora", **{**ADAPTERS, "lora_targets": "q_proj,v_proj"}) == 2 * (32 + 24)


def test_smollm2_counts_match_the_real_model():
    shape = KNOWN_SHAPES["smollm2-135m"]
    assert shape.num_params == 134_515_008
    # what `posttrain sft` prints for the embedded model
    assert memory.trainable_params(shape, "lora", lora_r=16, lora_targets="all-linear", num_virtual_tokens=20) == 4_884_480
    assert memory.trainable_params(shape, "prefix", lora_r=16, lora_targets="all-linear", num_virtual_tokens=20) == 230_400


def test_layer_activation_bytes_by_hand():
    def per_layer(method, precision, masked, q_len=4, kv_len=4):
        return memory.layer_activation_bytes(TINY, method, precision=precision, q_len=q_len, kv_len=kv_len,
                                           masked=masked, lora_r=2, lora_targets="all-linear")

    # full, fp32, no mask: norm inputs 2*8*4 (the fused norm keeps no normalised x) + linear inputs
    # (qkv 8 + gate/up 8 + down 16)*4 + SwiGLU 3*16*4 + q and output 2*8*4 + k, v 2*4*4 + logsumexp 2*4
    assert per_layer("full", "fp32", False) == 64 + 128 + 192 + 64 + 32 + 8
    # LoRA, fp32, masked: no normalised x; k, v repeated to 2 heads 2*8*4; mask 4 keys*4; lora_A outputs 7*2*4
    assert per_layer("lora", "fp32", True) == 64 + 128 + 192 + 64 + 64 + 8 + 16 + 56
    # prompt (frozen): no linear inputs at all
    assert per_layer("prompt", "fp32", False) == 64 + 192 + 64 + 32 + 8
    # prefix: k, v over 4 real + 3 virtual keys, repeated (masked), and a 7-key mask row
    assert per_layer("prefix", "fp32", True, kv_len=7) == 64 + 192 + 64 + 2 * 8 * 4 * 7 / 4 + 8 + 7 * 4
    # full, bf16: fp32 norm inputs; q, k, v, gate, up each keep a bf16 copy of their fp32
    # input (5*8*2), down's input is shared (16*2); the rest at 2 bytes
    assert per_layer("full", "bf16", False) == 64 + 112 + 96 + 32 + 16 + 8
    # LoRA, bf16: the fused norm keeps its bf16 input 2*8*2; inputs shared as in fp32 (PEFT's cast is off under
    # autocast): (8 + 8 + 16)*2; lora_A outputs 7*2*2
    assert per_layer("lora", "bf16", False) == 32 + 64 + 96 + 32 + 16 + 8 + 28


def test_activation_totals_by_hand():
    kw = dict(batch_size=1, seq_len=5, precision="fp32", gradient_checkpointing=False, packing=False, **ADAPTERS)
    # prompt: 5 + 3 virtual positions, per token 2 layers x 360 + final (norm input 8*4 + head rows 8*4)
    assert memory.activation_bytes(TINY, "prompt", **kw) == 8 * (2 * 360 + 64)
    # gradient checkpointing: each layer keeps its fp32 input (8*4), plus one layer recomputed
    assert memory.activation_bytes(TINY, "prompt", **{**kw, "gradient_checkpointing": True}) == 8 * (2 * 32 + 360 + 64)


def test_weights_logits_and_peak_by_hand():
    assert memory.weight_bytes(TINY, "full", "fp32") == 1272 * 4
    assert memory.weight_bytes(TINY, "full", "bf16") == 1272 * 4
    assert memory.autocast_copy_bytes(TINY, "full", "bf16", 1272) == (1152 + 80) * 2  # bf16 linears + head
    assert memory.autocast_copy_bytes(TINY, "lora", "bf16", 512) == 512 * 2
    assert memory.autocast_copy_bytes(TINY, "full", "fp32", 1272) == 0
    assert memory.weight_bytes(TINY, "lora", "bf16") == 1272 * 2
    assert memory.weight_bytes(TINY, "qlora", "bf16") == 1152 * 0.5 + 120 * 2  # NF4 linears, the rest in bf16
    assert memory.weight_bytes(TINY, "qlora", "fp32") == 1152 * 0.5 + 120 * 4  # NF4 linears, the rest in fp32
    # 2 x 4 positions (< chunk) x vocab 10: a frozen head (LoRA) 2 fp32 copies; full FT's trained head 3 fp32
    # copies in its recomputed backward, plus the head's fp32 gradient; bf16 adds the bf16 logits for full FT
    assert memory.logits_bytes(TINY, "lora", batch_size=2, seq_len=4, precision="fp32", loss_chunk_size=1024) == 640
    assert memory.logits_bytes(TINY, "full", batch_size=2, seq_len=4, precision="fp32", loss_chunk_size=1024) == 960 + 320
    assert memory.logits_bytes(TINY, "lora", batch_size=2, seq_len=4, precision="bf16", loss_chunk_size=3) == 3 * 10 * 8
    assert memory.logits_bytes(TINY, "full", batch_size=2, seq_len=4, precision="bf16", loss_chunk_size=3) == 3 * 10 * 14 + 320

    est = estimate(TINY, "full", device="cpu", precision="fp32", batch_size=1, seq_len=4, packing=False, **ADAPTERS)
    # final norm: input and head rows, 8*4 each; on a CPU with AVX2 the fused SwiGLU keeps no silu(gate) (16*4)
    fused = memory.fused_swiglu_expected(TINY, "cpu", "fp32")
    assert est.activations == 4 * (2 * (488 - (64 if fused else 0)) + 64)
    assert not memory.fused_swiglu_expected(TINY, "cuda", "fp32") and not memory.fused_swiglu_expected(TINY, "cpu", "bf16")
    full_fused = memory.layer_activation_bytes(TINY, "full", precision="fp32", q_len=4, kv_len=4, masked=False,
                                               fused_swiglu=True, lora_r=2, lora_targets="all-linear")
    assert full_fused == memory.layer_activation_bytes(TINY, "full", precision="fp32", q_len=4, kv_len=4, masked=False,
                                                       lora_r=2, lora_targets="all-linear") - 16 * 4  # one (f = 16) fp32 tensor less
    assert est.logits == 4 * 10 * 12 + 320
    assert est.grad_accumulation == 2 * 10 * 8 * 4  # tied, trained embedding: its second gradient and the sum
    assert estimate(TINY, "lora", device="cpu", precision="fp32", batch_size=1, seq_len=4, **ADAPTERS).grad_accumulation == 0
    static = est.weights + est.optimizer_state + memory.CPU_RUNTIME_BYTES
    assert est.total == static + max(est.activations + est.logits, est.gradients + est.grad_accumulation)  # fused AdamW: no step buffers


def test_flops_by_hand():
    # full, 1 x 4 tokens: linears 6 x 1152 x 4; attention 3 x (4 x 2 layers x 2 heads x 4 dims x 4 keys x 4 tokens);
    # head 2 x 80 x 4 per pass, 4 passes (forward, chunk recompute, input grad, weight grad)
    full = estimate(TINY, "full", device="cpu", precision="fp32", batch_size=1, seq_len=4, **ADAPTERS)
    assert full.flops_per_step == 6 * 1152 * 4 + 3 * 1024 + 4 * 640
    # LoRA: 4N (no weight gradients), 2 head passes (logits, input gradient formed in the forward),
    # + 6 FLOPs per LoRA parameter per token
    lora = estimate(TINY, "lora", device="cpu", precision="fp32", batch_size=1, seq_len=4, **ADAPTERS)
    assert lora.flops_per_step == 4 * 1152 * 4 + 3 * 1024 + 2 * 640 + 6 * 512 * 4


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="lora_targets"):
        memory.lora_target_set("q_proj,lm_head")
    with pytest.raises(ConfigError, match="seq_len"):
        PlanConfig(seq_len=0).validate()
    with pytest.raises(ConfigError, match="model"):
        shapes.load_shape("no-such-model")
    with pytest.raises(ConfigError, match="precision: expected one of auto, bf16, fp32"):
        estimate(TINY, "lora", precision="fp16")


def test_head_blocks_match_the_engine():
    from posttrain.models import forward

    assert memory.FROZEN_HEAD_BLOCK_ROWS == forward._HEAD_BLOCK_ROWS
    assert memory.TRAINED_HEAD_CHUNK_ROWS == forward._TRAINED_HEAD_CHUNK_ROWS


# --------------------------------------------------------------------------------------------- published figures
def test_qlora_fits_65b_on_one_48gb_gpu():
    """Dettmers et al. 2023 (QLoRA), abstract: 65B fine-tuned on a single 48 GB GPU. Their memory figure (fig. 6)
    uses batch 1, 512 tokens and gradient checkpointing."""
    shape = KNOWN_SHAPES["65b"]
    kw = dict(device="cuda", precision="bf16", batch_size=1, seq_len=512, gradient_checkpointing=True)
    assert estimate(shape, "qlora", **kw).total < 48 * GiB
    assert estimate(shape, "lora", **kw).total > 80 * GiB  # the bf16 base alone is ~130 GB
    assert estimate(shape, "full", **kw).total > 80 * GiB
    table, _ = report.fit_table(PlanConfig(batch_size=1, seq_len=512))
    row = next(line.split() for line in table.splitlines() if line.split()[:2] == ["65b", "qlora"])
    assert row[7] in ("yes", "gc")  # the 48 GB column (model, method, two sizes, 24 GB, 48 GB, ...)


def test_full_finetuning_7b_needs_16_bytes_per_param_plus_activations():
    """Mixed-precision AdamW: fp32 master weights 4 + gradients 4 + moments 8 = 16 bytes/param, ~112 GB for 7B
    (Rajbhandari et al. 2020, ZeRO, section 3.1), plus activations: no single 80 GB GPU holds it."""
    shape = KNOWN_SHAPES["7b"]
    est = estimate(shape, "full", device="cuda", precision="bf16", batch_size=1, seq_len=512)
    per_param = (shape.num_params * 4 + est.gradients + est.optimizer_state) / shape.num_params
    assert per_param == 16
    assert 105e9 < 16 * shape.num_params < 115e9
    assert est.weights == shape.num_params * 4 and est.total > 16 * shape.num_params
    assert est.total > 80 * GiB


# --------------------------------------------------------------------------------------------- autograd's truth
def _saved_activation_bytes(model, batch, bf16: bool) -> int:
    """Bytes of the distinct tensors autograd saves in one forward, leaving out weights and autocast's weight casts."""
    from posttrain.stages.sft import SFTObjective

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        is_weight_cast = t.grad_fn is not None and type(t.grad_fn).__name__ == "TBackward0"
        if storage.data_ptr() not in weights and not is_weight_cast:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        SFTObjective(1024).loss(model, batch)
    return sum(saved.values())


@pytest.mark.parametrize(
    "method, precision, packed",
    [("full", "fp32", True), ("lora", "fp32", True), ("qlora", "fp32", True), ("full", "fp32", False),
     ("lora", "fp32", False), ("prompt", "fp32", False), ("prefix", "fp32", False),
     ("full", "bf16", True), ("lora", "bf16", True), ("qlora", "bf16", True), ("prompt", "bf16", False),
     ("prefix", "bf16", False)],
)
def test_activation_count_matches_what_autograd_saves(tiny_model_dir, method, precision, packed):
    """The per-layer count is the tensors the HF Llama block keeps for backward, on the tiny random Llama."""
    from posttrain.commands.sft import SFTConfig
    from posttrain.models.adapters import build_model

    # The planner models transformers' sdpa with a block-diagonal mask for packed rows, an upper bound for the
    # default packed_spans kernel (no mask, no repeated k/v).
    cfg = SFTConfig(model=str(tiny_model_dir), method=method, attn_implementation="sdpa")
    if method == "qlora" and precision == "bf16":  # explicit; compute_dtype=auto gives the same under bf16
        cfg.qlora.compute_dtype = "bfloat16"
    model, report = build_model(cfg, mixed_precision="bf16" if precision == "bf16" else "no")
    model.train()
    shape = shapes.load_shape(str(tiny_model_dir))
    kw = dict(lora_r=cfg.lora.r, lora_targets="all-linear", num_virtual_tokens=cfg.prompt.num_virtual_tokens)
    assert report.trainable == memory.trainable_params(shape, method, **kw)

    batch_size, seq_len = (2, 48) if packed else (1, 48)  # one unpacked row runs without a mask
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (batch_size, seq_len))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if packed:  # what collate_packed gives one example per row
        causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
        batch["attention_mask"] = causal[None, None].expand(batch_size, 1, seq_len, seq_len).clone()
        batch["position_ids"] = torch.arange(seq_len)[None].expand(batch_size, seq_len).clone()
    measured = _saved_activation_bytes(model, batch, precision == "bf16")
    fused = memory.fused_swiglu_expected(shape, "cpu", precision)  # fp32 on an AVX2 CPU: silu(gate) not kept
    predicted = memory.activation_bytes(shape, method, batch_size=batch_size, seq_len=seq_len, precision=precision,
                                      gradient_checkpointing=False, packing=packed, fused_swiglu=fused, **kw)
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_shape_from_a_model_directory(tiny_model_dir):
    shape = shapes.load_shape(str(tiny_model_dir))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert (shape.hidden_size, shape.num_layers, shape.num_kv_heads) == (64, 2, 2)
    assert shape.params_on_disk is not None and shape.checkpoint_bytes_per_param == 4
    formula = ModelShape(**{**shape.__dict__, "params_on_disk": None})
    assert formula.num_params == shape.params_on_disk  # tied embeddings stored once
    assert config["tie_word_embeddings"] is True


# --------------------------------------------------------------------------------------------- the command
def test_run_plan_prints_every_method_and_a_recommendation(capsys):
    estimates = run_plan(PlanConfig(device="cpu", device_memory_gb=8, seq_len=128, batch_size=2))
    out = capsys.readouterr().out
    assert [e.method for e in estimates] == ["full", "lora", "qlora", "prompt", "prefix"]
    assert "recommended: lora" in out and "saves a full model of 513 MB" in out
    run_plan(PlanConfig(device="cpu", device_memory_gb=0.5))
    assert "nothing planned fits" in capsys.readouterr().out
    run_plan(PlanConfig(table=True))
    table = capsys.readouterr().out
    assert all(f"\n{name} " in table for name in ("1b", "7b", "13b", "70b"))


# --------------------------------------------------------------------------------------------- measured peaks
MEASURE_BATCH, MEASURE_SEQ_LEN = 2, 64


def _long_chat_rows(path: Path, rows: int = 8, words: int = 200) -> None:
    """Rows longer than MEASURE_SEQ_LEN tokens, so every row is truncated to exactly that length."""
    rng = random.Random(0)
    vocab = "river stone light garden number table window morning paper music yellow quiet travel bridge".split()
    with path.open("w") as f:
        for i in range(rows):
            answer = " ".join(rng.choice(vocab) for _ in range(words))
            messages = [{"role": "user", "content": f"Write words {i}."}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")


# Runs the posttrain CLI and, at exit, writes the process's own peak RSS (VmHWM, bytes) to argv[1].
REPORT_PEAK_AND_RUN = """
import atexit, re, sys
peak_file = sys.argv.pop(1)
def _report():
    status = open("/proc/self/status").read()
    open(peak_file, "w").write(str(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024))
atexit.register(_report)
from posttrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def measured_peaks(tmp_path_factory) -> dict[str, int]:
    """Peak RSS (bytes) of two real `posttrain sft` steps per method, each in a fresh process, fp32 on CPU.

    Each child reports its own VmHWM at exit. Not ``wait4``/``getrusage``: Linux folds the pre-exec image (a
    fork of this pytest process, gigabytes once other tests have loaded models) into the child's ru_maxrss.
    The processes run one per core, one thread each: wall time is what the CPUs allow, and RSS is per process.
    glibc raises its mmap threshold after the first large free, and from then on keeps freed activation
    memory in its heap, so peak RSS drifts 4-27% above what the tensors need (docs/plan.md). A fixed
    threshold makes RSS follow the live tensors, which is what the plan predicts.
    """
    tmp = tmp_path_factory.mktemp("peaks")
    data = tmp / "long.jsonl"
    _long_chat_rows(data)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, running, peaks = list(memory.METHODS), [], {}
    while pending or running:
        while pending and len(running) < (os.cpu_count() or 1):
            method = pending.pop(0)
            log = tmp / f"{method}.log"
            cmd = [sys.executable, "-c", REPORT_PEAK_AND_RUN, str(tmp / f"{method}.peak"), "sft", f"data.train={data}", f"method={method}", "max_steps=2",
                   f"batch_size={MEASURE_BATCH}", f"max_length={MEASURE_SEQ_LEN}", "precision=fp32",
                   "tensorboard=false", f"output_dir={tmp / method}"]
            with log.open("w") as out:
                running.append((method, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), log))
        method, proc, log = running.pop(0)
        assert proc.wait() == 0, log.read_text()[-3000:]
        peaks[method] = int((tmp / f"{method}.peak").read_text())
    return peaks


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prompt", "prefix"])
def test_predicted_peak_is_within_15_percent_of_measured_rss(measured_peaks, method):
    measured = measured_peaks[method]
    predicted = estimate(KNOWN_SHAPES["smollm2-135m"], method, device="cpu", precision="fp32",
                         batch_size=MEASURE_BATCH, seq_len=MEASURE_SEQ_LEN).total
    assert abs(predicted - measured) / measured < 0.15, f"{method}: predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"


def test_engine_optimizer_is_fused_adamw_and_steps_like_foreach():
    """The planner counts no optimizer-step buffers because the engine's AdamW is the fused one (in place); its
    update must be AdamW's: same as torch's foreach AdamW, decay on matrices only."""
    from posttrain.commands.base import TrainConfig
    from posttrain.engine.trainer import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    reference = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    foreach = torch.optim.AdamW([{"params": [reference[0].weight], "weight_decay": 0.1},
                                 {"params": [reference[0].bias, *reference[1].parameters()], "weight_decay": 0.0}],
                                lr=1e-2, foreach=True)
    x = torch.randn(4, 6)
    for _ in range(3):
        for m, opt in ((model, fused), (reference, foreach)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)  # a wrong decay group is off by ~3e-4


def test_auto_precision_follows_the_engine(monkeypatch):
    """plan's precision=auto is the engine's: bf16 on a GPU and on a CPU with native bf16, else fp32."""
    from posttrain import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert memory.resolve_precision("auto", "cpu") == "fp32" and memory.resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert memory.resolve_precision("auto", "cpu") == "bf16"
    assert memory.resolve_precision("fp32", "cpu") == "fp32"


# --------------------------------------------------------------------------------------------- the families
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_shapes_and_lora_counts_match_the_built_model(family, family_dirs):
    """Every family's local config.json is planned: LoRA's trainable count (phi3's fused projections, MoE
    attention only or with its experts) equals what build_model trains."""
    from posttrain.commands.sft import SFTConfig
    from posttrain.models.adapters import build_model

    model_dir = family_dirs(family)
    shape = shapes.load_shape(str(model_dir))
    assert shape.model_type == json.loads((model_dir / "config.json").read_text())["model_type"]
    options = [False, True] if shape.num_experts else [False]
    for experts in options:
        cfg = SFTConfig(model=str(model_dir), method="lora")
        cfg.lora.target_experts = experts
        _, report = build_model(cfg)
        assert report.trainable == memory.trainable_params(shape, "lora", lora_r=16, lora_targets="all-linear",
                                                         num_virtual_tokens=20, lora_experts=experts), family


def test_moe_and_window_terms_by_hand():
    """Qwen3-30B-A3B: every parameter counted (30.5B; the model card says 30.5B, 3.3B active with the
    embeddings); gpt-oss-20b: 20.9B (21B), its 128-token windows halve the attention FLOPs of its sliding layers."""
    qwen = shapes.load_shape("Qwen/Qwen3-30B-A3B")
    assert qwen.num_experts == 128 and qwen.experts_per_token == 8 and qwen.sliding_layers == 0
    assert round(qwen.num_params / 1e9, 1) == 30.5
    embeddings = 2 * qwen.vocab_size * qwen.hidden_size
    assert qwen.active_params + embeddings == pytest.approx(3.3e9, rel=0.02)  # 3.35B counted
    oss = shapes.load_shape("gpt-oss-20b")  # the name after the owner is enough
    assert (oss.sliding_window, oss.sliding_layers, oss.exact_attention) == (128, 12, True)
    assert round(oss.num_params / 1e9, 1) == 20.9
    windowed = memory.flops_per_step(oss, "lora", batch_size=1, seq_len=4096, num_virtual_tokens=0, trainable=0,
                                   gradient_checkpointing=False)
    dense = memory.flops_per_step(ModelShape(**{**oss.__dict__, "sliding_window": None, "sliding_layers": 0}), "lora",
                                batch_size=1, seq_len=4096, num_virtual_tokens=0, trainable=0,
                                gradient_checkpointing=False)
    attention = 4 * oss.num_heads * oss.head_dim * 4096 * 4096 * (4 if oss.exact_attention else 3)
    assert dense - windowed == pytest.approx(12 * attention * (1 - 128 / 4096), rel=1e-9)
    # QLoRA quantizes the attention only: the experts are not linear layers
    assert memory.weight_bytes(qwen, "qlora", "bf16") > 0.9 * memory.weight_bytes(qwen, "lora", "bf16")


@pytest.mark.parametrize("hub_id", list(shapes.HUB_CONFIGS))
def test_known_hub_ids_plan_without_the_network(hub_id, capsys):
    run_plan(PlanConfig(model=hub_id, device_memory_gb=80))
    assert hub_id in capsys.readouterr().out


def test_unknown_target_names_are_checked_against_the_family(family_dirs):
    shape = shapes.load_shape(str(family_dirs("phi3")))
    with pytest.raises(ConfigError, match="qkv_proj"):
        memory.trainable_params(shape, "lora", lora_r=8, lora_targets=["q_proj"], num_virtual_tokens=0)


PLANNED_WITHIN_10_PERCENT = ["llama_untied", "qwen2", "qwen3", "qwen3_moe", "mistral", "phi3", "granite", "smollm3"]


CASES = [("lora", "fp32", False), ("lora", "bf16", False), ("full", "fp32", False)]


@pytest.mark.parametrize("family,method,precision,experts",
                         [(f, *case) for f in PLANNED_WITHIN_10_PERCENT for case in CASES]
                         + [("qwen3_moe", "lora", "fp32", True), ("qwen3_moe", "lora", "bf16", True)])
def test_family_activations_match_what_autograd_saves(family, method, precision, experts, family_dirs):
    """The activation model on the families' own blocks (QK-norm, fused projections, experts). Gemma 2/3 and
    OLMo 2 keep more than planned under bf16 and gpt-oss's sinks cannot run SDPA: docs/plan.md says by how much."""
    from posttrain.commands.sft import SFTConfig
    from posttrain.models.adapters import build_model

    model_dir = family_dirs(family)
    shape = shapes.load_shape(str(model_dir))
    cfg = SFTConfig(model=str(model_dir), method=method, attn_implementation="sdpa")
    cfg.lora.target_experts = experts
    model, _ = build_model(cfg, mixed_precision="bf16" if precision == "bf16" else "no")
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (2, 48))
    causal = torch.tril(torch.ones(48, 48, dtype=torch.bool))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(48)[None].expand(2, 48).clone(),
             "attention_mask": causal[None, None].expand(2, 1, 48, 48).clone()}
    measured = _saved_activation_bytes(model, batch, precision == "bf16")
    predicted = memory.activation_bytes(shape, method, batch_size=2, seq_len=48, precision=precision,
                                      gradient_checkpointing=False, packing=True, lora_r=16, lora_targets="all-linear",
                                      num_virtual_tokens=20, lora_experts=experts,
                                      fused_swiglu=memory.fused_swiglu_expected(shape, "cpu", precision))
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_per_process_plan_by_hand():
    """ddp adds the gradient buckets; fsdp divides the sharded state by N and adds the gathered root + 2 layers."""
    s = KNOWN_SHAPES["7b"]
    one = estimate(s, "full", seq_len=512, batch_size=1, precision="bf16", device="cuda")
    ddp = memory.per_process(one, s, processes=8, strategy="ddp", precision="bf16")
    assert ddp.communication == one.gradients and ddp.total == one.total + one.gradients
    assert memory.per_process(one, s, processes=1, strategy="ddp").total == one.total  # one process: no buckets
    f = memory.per_process(one, s, processes=8, strategy="fsdp", precision="bf16")
    assert (f.weights, f.gradients, f.optimizer_state) == (one.weights // 8, one.gradients // 8, one.optimizer_state // 8)
    embed = s.vocab_size * s.hidden_size * 2  # untied: embedding + head
    layer = (s.num_params - embed - s.hidden_size) // s.num_layers
    assert f.communication == (embed + s.hidden_size + 2 * layer) * 4  # fp32 master weights gathered
    assert f.unsharded_grads == embed * 4
    assert f.activations == one.activations  # activations are per process and not sharded
    off = memory.per_process(one, s, processes=8, strategy="fsdp", offload=True, precision="bf16")
    assert off.weights == off.gradients == off.optimizer_state == 0 and off.total < f.total
    lora = estimate(s, "lora", precision="bf16", device="cuda")
    lf = memory.per_process(lora, s, processes=8, strategy="fsdp", precision="bf16")
    assert lf.communication == (embed + s.hidden_size + 2 * layer) * 2 and lf.unsharded_grads == 0  # bf16 frozen base
    q = estimate(s, "qlora", precision="bf16", device="cuda")
    qf = memory.per_process(q, s, processes=8, strategy="fsdp", precision="bf16")
    nf4 = int(s.linear_params * memory.NF4_BYTES_PER_PARAM)  # the 4-bit linears stay whole on every process
    assert qf.weights == nf4 + (q.weights - nf4) // 8
    with pytest.raises(ConfigError, match="prompt"):
        memory.per_process(estimate(s, "prompt"), s, processes=2, strategy="fsdp")
    with pytest.raises(ConfigError, match="offload"):
        memory.per_process(one, s, processes=2, strategy="ddp", offload=True)


def test_plan_per_device_and_the_eight_device_column(capsys):
    run_plan(PlanConfig(model="7b", method="all", processes=8, strategy="fsdp", device_memory_gb=80))
    out = capsys.readouterr().out
    assert "per process of 8, strategy fsdp" in out
    table_part = out.split("trade-offs:")[0]
    methods = [line.split()[0] for line in table_part.splitlines()
               if line.split() and line.split()[0] in ("full", "lora", "qlora", "prompt", "prefix")]
    assert methods == ["full", "lora", "qlora"]  # only what posttrain shards
    run_plan(PlanConfig(table=True))
    table = capsys.readouterr().out
    assert "8x80 GB" in table
    row = next(line for line in table.splitlines() if line.split()[:2] == ["7b", "full"])
    assert row.split()[-4:-2] == ["yes", "fsdp"]  # 7B full FT fits 8 x 80 GB with FSDP, not one 80 GB GPU
