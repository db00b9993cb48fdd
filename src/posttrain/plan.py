"""``posttrain plan``: predict the peak memory and the FLOPs of a training step, per method, before training.

The model is analytical and follows how posttrain trains (``engine/trainer.py``, ``models/adapters.py``,
``models/forward.py``). Every term is a pure function of the model shape and the settings:

    peak = weights + adapter + optimizer_state + quantization_overhead + runtime_overhead
           + max(autocast_copies + activations + logits, gradients + grad_accumulation)

1. Weights. Full fine-tuning keeps fp32 master weights (4 B/param). Under bf16 autocast, each forward also
   caches a bf16 copy of every matmul weight that requires grad (full FT's weights, LoRA's matrices), alive
   until backward has used it (2 B/param, ``autocast_copies``). Adapter methods store the frozen base in the
   forward dtype (bf16 2 B, fp32 4 B). QLoRA stores the decoder linears in NF4, 0.5 B/param, plus
   0.127 bit/param of double-quantized block constants
   (8-bit absmax per 64 weights plus an fp32 absmax per 256 blocks; Dettmers et al. 2023, section 3).
   Embeddings, norms and the head stay unquantized, in the forward dtype as a LoRA base
   (``models.adapters.store_unquantized_in`` undoes ``peft.prepare_model_for_kbit_training``'s fp32 upcast
   under bf16). On CPU in fp32 from an fp32 checkpoint, those fp32 tensors are views of the mmapped file, so
   the linears' fp32 pages read while quantizing stay resident.
2. Trainable parameters are fp32. AdamW keeps two fp32 moments (8 B/param) and the gradients are fp32
   (4 B/param). The engine's AdamW is the fused one, which updates in place: ``optimizer.step`` allocates
   nothing (the foreach one would allocate a sqrt(v) buffer of all trainable parameters on CUDA, and two
   temporaries of the largest tensor on CPU; measured on CPU: 216 MB vs 0.03 MB for SmolLM2's embedding).
3. Activations are the tensors autograd saves for backward, counted per token and per decoder layer from the
   HF Llama block (:func:`layer_activation_bytes`). The derivation follows Korthikanti et al. 2022 ("Reducing
   Activation Recomputation in Large Transformer Models", section 4.1: sbh(34 + 5as/h) bytes per layer at
   16 bits), adapted to Llama: SwiGLU and RMSNorm, no dropout, grouped KV heads, and SDPA, whose flash
   kernels keep q, k, v, the output and a logsumexp but no a*s*s score matrix. Frozen weights change what
   is kept: a frozen linear keeps no copy of its input. Norms run models/fused_norm.py, which keeps only
   their input (fp32, or bf16 under autocast) and no normalised copy. With
   gradient checkpointing, each layer keeps only its input, plus one layer's activations while that layer
   is recomputed. Under bf16 autocast some linear inputs are kept once per reader
   (:func:`linear_input_bytes`).
4. Gradients and activations do not peak together. Backward frees a layer's activations as it produces that
   layer's gradients, so their sum is linear between the two ends of backward and peaks at one of them.
5. Logits. The loss runs the head and the cross-entropy on at most ``loss_chunk_size`` target positions at
   a time, never on the (B, T, V) logits. A trained head (full fine-tuning) is recomputed per chunk (at most
   256 rows) in backward: about three fp32 (chunk, V) tensors (logits, log-softmax, gradient) exist at once, and the
   head's weight gradient, the first gradient backward produces, exists at the same time. A frozen head
   (adapter methods) has its per-row gradient formed in the forward, 128 rows at a time: two fp32 (128, V)
   tensors.
6. Runtime. On CPU this is the resident size of Python + torch + transformers + peft + the tokenizer and the
   data, measured (:data:`CPU_RUNTIME_BYTES`). On CUDA it is the context plus the cuBLAS workspace
   (:data:`CUDA_RUNTIME_BYTES`).

FLOPs per step. With N the matmul parameters, full fine-tuning costs 6N per token: forward 2N, input
gradients 2N, weight gradients 2N. Frozen-base methods cost 4N per token, since no weight gradients are
computed. Attention adds 12·L·a·d·T per token (PaLM, Chowdhery et al. 2022, appendix B: forward 4·L·a·d·T,
backward twice that, with no discount for the causal mask). The head costs 2·V·h per target token for its
logits and as much for the input gradient; a trained head adds its weight gradient and the recompute of its
chunks in backward (2·V·h each). LoRA is counted as PEFT's unmerged branch, 6 FLOPs per adapter parameter per
token (the merged fp32 path of models/fused_lora.py does 4 plus a merge per step; the difference is under 1%
of a step). Gradient checkpointing adds a second forward of the layers.
docs/plan.md gives the derivation, the sources and the calibration against measured peaks.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.config import METHODS, opt
from posttrain.errors import ConfigError

GiB = 2**30
MiB = 2**20

# RSS of `python -m posttrain sft` on CPU before any weight or activation memory: the interpreter, torch,
# transformers, peft, accelerate, bitsandbytes, the tokenizer and the data. Measured as the RSS once the model
# object is built and before the first step: 426-428 MiB for full, prompt and prefix, whose base weights are
# still an untouched mmap at that point (torch 2.13, transformers 5.24, 2-core x86 Linux; docs/plan.md).
CPU_RUNTIME_BYTES = 428 * MiB
# CUDA context (kernel images, loaded lazily) plus the cuBLAS workspace, as PyTorch reports it on recent GPUs.
# torch.cuda.max_memory_allocated does not count it; nvidia-smi does.
CUDA_RUNTIME_BYTES = 512 * MiB
NF4_BYTES_PER_PARAM = 0.5
# bitsandbytes double quantization: an 8-bit absmax per 64-weight block, plus an fp32 absmax per 256 blocks.
DOUBLE_QUANT_BYTES_PER_PARAM = (8 / 64 + 32 / (64 * 256)) / 8
# Live (chunk, V) fp32 tensors in the backward of one loss chunk: log-softmax, its gradient, the logits' gradient.
LOSS_CHUNK_COPIES = 3
# Live (rows, V) fp32 tensors when a frozen head's gradient is formed in the forward (models/forward.py):
# the logits and their log-softmax, which then becomes the softmax in place; a chunk runs in blocks of
# FROZEN_HEAD_BLOCK_ROWS rows, so only one block's tensors exist at a time.
FROZEN_HEAD_CHUNK_COPIES = 2
FROZEN_HEAD_BLOCK_ROWS = 128
# A trained head's checkpointed chunks hold at most this many rows (models/forward.py).
TRAINED_HEAD_CHUNK_ROWS = 256
# Methods whose examples are packed into rows (models/adapters.PACKING_METHODS; a test keeps them equal).
PACKING_METHODS = ("full", "lora", "qlora")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3
ATTENTION_INPUT = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj"})  # linears that read the attention input
MLP_INPUT = frozenset({"gate_proj", "up_proj", "gate_up_proj"})  # linears that read the MLP input
EXACT_BLOCK_ROWS = 128  # models/attention.py: query rows per checkpointed block of the exact products


# --------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """A decoder of the Llama form (attention + gated MLP per layer), with what the supported families vary:
    fused projections (Phi-3), a mixture of experts in place of the MLP (Qwen3-MoE, gpt-oss), sliding-window
    layers, and attention posttrain computes as exact products (soft-capping, sinks)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    source: str
    params_on_disk: int | None = None  # counted from safetensors headers, when the shape came from a directory
    checkpoint_bytes_per_param: float = 2.0  # dtype of the stored weights (hub checkpoints: bf16/fp16)
    model_type: str = "llama"
    num_experts: int = 0  # 0: a dense MLP; else each layer's MLP is this many experts (stacked 3-D parameters)
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    sliding_window: int | None = None
    sliding_layers: int = 0  # layers that attend within the window
    exact_attention: bool = False  # soft-capped or sink attention: posttrain's exact per-span products
    qk_norm: bool = False  # RMSNorm on the queries and keys (Qwen3, Gemma 3, OLMo 2)

    @property
    def fused(self) -> bool:
        """Phi-3's fused qkv_proj and gate_up_proj."""
        return self.model_type == "phi3"

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer (``nn.Linear``) of one decoder layer. An MoE layer's experts are not
        linear layers (see :attr:`expert_params`)."""
        h, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.fused:
            attention = {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h)}
        else:
            attention = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.num_experts:
            return attention
        if self.fused:
            return {**attention, "gate_up_proj": (h, 2 * f), "down_proj": (f, h)}
        return {**attention, "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of one expert's projections: the gated pair stacked as gate_up_proj, then down_proj."""
        if not self.num_experts:
            return {}
        h, i = self.hidden_size, self.expert_intermediate_size
        return {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Decoder-layer linear weights: what QLoRA quantizes (bitsandbytes replaces ``nn.Linear`` layers only)."""
        return self.num_layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def expert_params(self) -> int:
        """All experts' weights, plus the routers' (experts x hidden per layer)."""
        if not self.num_experts:
            return 0
        per_expert = sum(i * o for i, o in self.expert_shapes().values())
        return self.num_layers * self.num_experts * (per_expert + self.hidden_size)

    @property
    def active_params(self) -> int:
        """The matmul weights one token passes through: linears, its experts_per_token experts and the router."""
        if not self.num_experts:
            return self.linear_params
        per_expert = sum(i * o for i, o in self.expert_shapes().values())
        return self.linear_params + self.num_layers * (self.experts_per_token * per_expert
                                                       + self.num_experts * self.hidden_size)

    def features(self) -> list[str]:
        """What the plan models beyond a dense Llama, one line each."""
        lines = []
        if self.num_experts:
            lines.append(f"{self.model_type}: {self.num_experts} experts, {self.experts_per_token} per token "
                         f"({human_count(self.active_params)} matmul weights per token); experts stay unquantized under "
                         "QLoRA (they are not linear layers) and LoRA adapts them only with lora_target_experts")
        if self.sliding_window:
            lines.append(f"sliding window of {self.sliding_window} tokens on {self.sliding_layers} of "
                         f"{self.num_layers} layers (their attention FLOPs see at most the window)")
        if self.exact_attention:
            lines.append("soft-capped or sink attention: exact products in checkpointed 128-row blocks "
                         "(recomputed in backward)")
        return lines

    @property
    def head_params(self) -> int:
        """The output projection's weights, stored once when tied to the embeddings."""
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        if self.params_on_disk is not None:
            return self.params_on_disk
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.linear_params + self.expert_params + embeddings + norms


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _llama(name, vocab, h, f, layers, heads, kv_heads, tie, source, checkpoint_bytes=2.0) -> ModelShape:
    return ModelShape(name, vocab, h, f, layers, heads, kv_heads, h // heads, tie, source,
                      checkpoint_bytes_per_param=checkpoint_bytes)


KNOWN_SHAPES: dict[str, ModelShape] = {
    "smollm2-135m": _llama("smollm2-135m", 49152, 576, 1536, 30, 9, 3, True,
                           "SmolLM2-135M-Instruct config.json (the embedded model)", checkpoint_bytes=4.0),
    "1b": _llama("1b", 128256, 2048, 8192, 16, 32, 8, True, "Llama 3.2 1B config.json (meta-llama/Llama-3.2-1B)"),
    "7b": _llama("7b", 32000, 4096, 11008, 32, 32, 32, False, "Llama 2 7B (Touvron et al. 2023b, meta-llama/Llama-2-7b-hf config.json)"),
    "13b": _llama("13b", 32000, 5120, 13824, 40, 40, 40, False, "Llama 2 13B (Touvron et al. 2023b, meta-llama/Llama-2-13b-hf config.json)"),
    "65b": _llama("65b", 32000, 8192, 22016, 80, 64, 64, False, "LLaMA 65B (Touvron et al. 2023a, table 2; the QLoRA paper's model)"),
    "70b": _llama("70b", 32000, 8192, 28672, 80, 64, 8, False, "Llama 2 70B (Touvron et al. 2023b, meta-llama/Llama-2-70b-hf config.json)"),
}


def safetensors_sizes(directory: Path) -> tuple[int, int] | None:
    """(parameters, bytes) stored in a directory's safetensors files, read from their JSON headers only."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    params = nbytes = 0
    for path in files:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, tensor in header.items():
            if key != "__metadata__":
                params += math.prod(tensor["shape"])
                nbytes += tensor["data_offsets"][1] - tensor["data_offsets"][0]
    return params, nbytes


QK_NORM_TYPES = ("qwen3", "qwen3_moe", "gemma3_text", "olmo2")  # families that normalise q and k
SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "mistral", "phi3", "olmo2",
                   "granite", "smollm3", "gpt_oss")


def shape_from_config(config: dict, *, name: str, source: str, params_on_disk: int | None = None,
                      checkpoint_bytes_per_param: float = 2.0) -> ModelShape:
    """A :class:`ModelShape` from a transformers ``config.json`` (a multimodal checkpoint's ``text_config``)."""
    if "text_config" in config and "hidden_size" not in config:
        config = config["text_config"]
    model_type = config.get("model_type", "llama")
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
    keys += ["moe_intermediate_size" if model_type == "qwen3_moe" else "intermediate_size"]
    missing = [k for k in keys if k not in config]
    if missing:
        raise ConfigError(f"model: {source} lacks {', '.join(missing)}; plan models decoders of the families "
                          f"{', '.join(SUPPORTED_TYPES)}")
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    types = config.get("layer_types")
    if window and not types and model_type == "gemma3_text":  # configs without layer_types: every 6th is global
        period = config.get("sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)]
    if window and not types and model_type in ("gemma2", "gpt_oss"):  # alternating, local first
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    sliding = (sum(t == "sliding_attention" for t in types) if types else layers) if window else 0
    per_token = (config.get("num_experts_per_tok") or config.get("experts_per_token") or 0) if experts else 0
    expert_size = (config.get("moe_intermediate_size") or config.get("intermediate_size", 0)) if experts else 0
    return ModelShape(
        name=name,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config.get("intermediate_size", 0),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tie_embeddings=bool(config.get("tie_word_embeddings", model_type in ("gemma2", "gemma3_text"))),
        source=source,
        params_on_disk=params_on_disk,
        checkpoint_bytes_per_param=checkpoint_bytes_per_param,
        model_type=model_type,
        num_experts=experts,
        experts_per_token=per_token,
        expert_intermediate_size=expert_size,
        sliding_window=window or None,
        sliding_layers=sliding,
        exact_attention=bool(config.get("attn_logit_softcapping")) or model_type == "gpt_oss",
        qk_norm=model_type in QK_NORM_TYPES,
    )


def shape_from_hf_dir(directory: str | Path) -> ModelShape:
    """Shape of a Hugging Face model directory: config.json, plus parameter counts from safetensors headers."""
    path = Path(directory)
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model: {path}/config.json is not valid JSON ({e})") from None
    sizes = safetensors_sizes(path)
    return shape_from_config(config, name=path.name, source=f"{path}/config.json",
                             params_on_disk=sizes[0] if sizes else None,
                             checkpoint_bytes_per_param=sizes[1] / max(sizes[0], 1) if sizes else 2.0)


# The shapes of popular checkpoints of the supported families, so `posttrain plan model=Qwen/Qwen3-8B` needs no
# network: the config.json keys the planner reads, as each hub repository's config.json gives them (gpt-oss-20b
# ships MXFP4 experts; transformers dequantizes them to bf16 for training, which is what is planned).
HUB_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "meta-llama/Llama-3.2-3B-Instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, sliding_window=131072,
        use_sliding_window=False),
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "Qwen/Qwen3-30B-A3B": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, tie_word_embeddings=False),
    "google/gemma-2-9b-it": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, tie_word_embeddings=True),
    "google/gemma-3-12b-it": dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024, sliding_window_pattern=6,
        tie_word_embeddings=True),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=None, tie_word_embeddings=False),
    "microsoft/phi-4": dict(
        model_type="phi3", vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=10, sliding_window=None, tie_word_embeddings=False),
    "openai/gpt-oss-20b": dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128, tie_word_embeddings=False),
    "allenai/OLMo-2-1124-7B-Instruct": dict(
        model_type="olmo2", vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "ibm-granite/granite-3.3-8b-instruct": dict(
        model_type="granite", vocab_size=49159, hidden_size=4096, intermediate_size=12800, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM3-3B": dict(
        model_type="smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True),
}


def _hub_key(spec: str) -> str | None:
    """The known hub id ``spec`` names: exactly, case-insensitively, or by its name after the owner."""
    lowered = spec.lower()
    for key in HUB_CONFIGS:
        if lowered in (key.lower(), key.split("/", 1)[1].lower()):
            return key
    return None


def load_shape(spec: str) -> ModelShape:
    """``smollm2-135m``, a size name (1b, 7b, 13b, 65b, 70b), a known hub id (:data:`HUB_CONFIGS`, with or
    without its owner) or a local Hugging Face directory."""
    if spec in KNOWN_SHAPES:
        return KNOWN_SHAPES[spec]
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return shape_from_hf_dir(path)
    key = _hub_key(spec)
    if key is not None:
        return shape_from_config(HUB_CONFIGS[key], name=key, source=f"{key} config.json (known shape, no download)")
    raise ConfigError(f"model: '{spec}' is not one of {', '.join(KNOWN_SHAPES)}, a known hub id "
                      f"({', '.join(HUB_CONFIGS)}) nor a local directory with a config.json")


# --------------------------------------------------------------------------------------------- the math
def lora_target_set(targets: str | list[str], shape: ModelShape | None = None) -> frozenset[str]:
    """``all-linear`` (every linear layer of a decoder layer: for an MoE model, the attention's) or a list /
    comma-separated string of names, checked against ``shape``'s linears (or any family's, without one)."""
    known = tuple(shape.linear_shapes()) if shape is not None else tuple(dict.fromkeys(LINEARS + FUSED_LINEARS))
    if targets == "all-linear":
        return frozenset(known)
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ConfigError(f"lora_targets: unknown module(s) {unknown or names}; use all-linear or names from {', '.join(known)}")
    return frozenset(names)


def trained_linears(method: str, lora_targets: str | list[str], shape: ModelShape) -> frozenset[str]:
    """Linears whose input autograd keeps: trained weights (full) or LoRA-adapted ones."""
    if method == "full":
        return frozenset(shape.linear_shapes())
    if method in ("lora", "qlora"):
        return lora_target_set(lora_targets, shape)
    return frozenset()


def experts_train(shape: ModelShape, method: str, lora_experts: bool) -> bool:
    """The experts' weights get gradients: full fine-tuning, or LoRA with lora.target_experts."""
    return bool(shape.num_experts) and (method == "full" or (method in ("lora", "qlora") and lora_experts))


def trainable_params(shape: ModelShape, method: str, *, lora_r: int, lora_targets: str | list[str],
                     num_virtual_tokens: int, lora_experts: bool = False) -> int:
    if method == "full":
        return shape.num_params
    if method in ("lora", "qlora"):
        linears = shape.linear_shapes()
        count = shape.num_layers * sum(lora_r * sum(linears[name]) for name in lora_target_set(lora_targets, shape))
        if experts_train(shape, method, lora_experts):  # PEFT's ParamWrapper: one (r, in) x (out, r) pair per expert
            count += shape.num_layers * shape.num_experts * lora_r * sum(sum(io) for io in shape.expert_shapes().values())
        return count
    if method == "prompt":
        return num_virtual_tokens * shape.hidden_size
    if method == "prefix":  # a key and a value per virtual token and layer (PEFT, no projection)
        return num_virtual_tokens * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim
    raise AssertionError(method)


def grad_accumulation_bytes(shape: ModelShape, method: str) -> int:
    """Transient at the end of backward. A tied embedding that trains (full FT) gets two gradients: the head's,
    already in ``.grad``, and the lookup's dense one, made last; autograd adds them out of place, so for a moment
    the old, the new and the sum exist together: two embeddings' worth above the gradients. Measured on CPU
    (SmolLM2-135M, full FT): 216 MiB over weights + optimizer state + all gradients, 2 x its 108 MiB embedding.
    Untied, the lookup's gradient is the embedding's only one and is counted in the gradients."""
    if method != "full" or not shape.tie_embeddings:
        return 0
    return 2 * shape.head_params * 4


def residual_bytes(method: str, precision: str) -> int:
    """Bytes per element of the residual stream: fp32 when the embeddings are fp32 (fp32, or full FT's fp32
    masters under bf16 autocast)."""
    return 4 if precision == "fp32" or method == "full" else 2


def linear_input_bytes(shape: ModelShape, method: str, precision: str, trained: frozenset[str]) -> int:
    """Bytes per token of the linear inputs that one layer keeps for its weight (or lora_A) gradients.

    In fp32, each input is one tensor that its readers share: the attention input (q/k/v), the MLP input
    (gate/up) and the down input. o_proj's input is the attention output's own storage, already counted.
    Under bf16 autocast, some readers keep their own bf16 copy:
    - an input that arrives in fp32 is cast once per linear that reads it. The norm outputs are fp32 when the
      residual stream is (full FT), so q, k, v, gate and up each keep one;
    - PEFT's LoRA layer would cast its input to the fp32 adapter dtype for autocast to cast it back for lora_A,
      a copy per adapted linear; posttrain's forward turns that cast off under autocast
      (``models.forward.lora_input_casts_off``), so LoRA and QLoRA share their inputs as in fp32.
    """
    e = 2 if precision == "bf16" else 4
    h = shape.hidden_size
    inputs = {name: fan_in for name, (fan_in, _) in shape.linear_shapes().items()}
    if precision == "fp32" or method in ("lora", "qlora"):
        return e * (h * bool(trained & ATTENTION_INPUT) + h * bool(trained & MLP_INPUT)
                    + inputs.get("down_proj", 0) * ("down_proj" in trained))
    own_copy = trained & (ATTENTION_INPUT | MLP_INPUT)
    shared = (trained & {"down_proj"}) - own_copy
    return e * sum(inputs[name] for name in own_copy | shared)


def layer_activation_bytes(shape: ModelShape, method: str, *, precision: str, q_len: int, kv_len: int, masked: bool,
                           lora_r: int, lora_targets: str | list[str], lora_experts: bool = False) -> float:
    """Bytes autograd keeps per query token for one HF ``LlamaDecoderLayer`` with SDPA attention.

    Korthikanti et al.'s per-layer count (34 h per token at 2 bytes, plus 5as for the scores), redone for the
    Llama block with e = bytes per activation element:
      RMSNorm x2        input, in the residual stream's dtype: 2 * h * 4 (fp32, or full fine-tuning's fp32 stream)
                        or 2 * h * 2 (a bf16 base); models/fused_norm.py keeps the input itself and no
                        normalised copy, where the eager module would keep its fp32 upcast
      linear inputs     see :func:`linear_input_bytes`: kept only for linears that train or carry LoRA (a frozen
                        linear needs only its weight in backward)
      SwiGLU            3 * f * e: the gate output, silu(gate) and the up output
      attention         2 * a*d * e: q after RoPE, and the output. k and v take 2 * kv*d * e, or 2 * a*d * e
                        repeated to every head when a mask is passed, times kv_len / q_len. The logsumexp
                        takes a * 4. A mask adds its float copy, kv_len * e per query row.
      LoRA              r * e per adapted linear (lora_A's output)
      QK-norm           (a + kv) * d * e: the q and k norms' inputs (Qwen3, Gemma 3, OLMo 2)
      experts (MoE)     in place of SwiGLU, for each of the k experts a token is routed to: its gate and up
                        outputs and silu(gate) (3 * i), its output before the routing weight (h), and when the
                        experts train the projections' inputs (h + i), in the experts' dtype (fp32 for full FT:
                        autocast does not cast grouped_mm); the router's fp32 probabilities (experts * 4) and
                        the routing indices and weights (24 bytes per routed expert)
    """
    e = 2 if precision == "bf16" else 4
    h, f, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    trained = trained_linears(method, lora_targets, shape)
    kv_heads = shape.num_heads if masked else shape.num_kv_heads
    per_token = 2 * h * residual_bytes(method, precision)
    per_token += linear_input_bytes(shape, method, precision, trained)
    if shape.num_experts:
        # transformers' grouped_mm experts run in their weights' dtype (autocast does not cast grouped_mm): fp32
        # for full fine-tuning's masters, the base dtype otherwise
        i, k = shape.expert_intermediate_size, shape.experts_per_token
        x = 4 if method == "full" else e
        per_token += k * (3 * i + h) * x + shape.num_experts * 4 + k * 24  # + routing indices and weights
        if experts_train(shape, method, lora_experts):
            per_token += k * (h + i) * x  # the projections' inputs: the token's copy, silu(gate) * up
    else:
        per_token += 3 * f * e
    per_token += 2 * shape.num_heads * d * e
    per_token += 2 * kv_heads * d * e * kv_len / q_len
    per_token += shape.num_heads * 4
    if shape.qk_norm:  # the norms' inputs: q and k before normalisation
        per_token += (shape.num_heads + shape.num_kv_heads) * d * e
    if masked:
        per_token += kv_len * e
    if method in ("lora", "qlora"):
        per_token += lora_r * e * len(trained)
    return per_token


def sequence_lengths(method: str, seq_len: int, num_virtual_tokens: int) -> tuple[int, int]:
    """(query positions, key positions) per row: prompt tuning prepends its tokens, prefix tuning its keys."""
    q_len = seq_len + num_virtual_tokens if method == "prompt" else seq_len
    kv_len = q_len + num_virtual_tokens if method == "prefix" else q_len
    return q_len, kv_len


def attention_is_masked(method: str, *, batch_size: int, packing: bool) -> bool:
    """Whether SDPA receives an explicit mask (and so repeats k/v to every head and keeps a float mask).

    Packed rows carry a block-diagonal mask; prefix keys make the mask rectangular; unpacked batches of several
    rows are padded to the longest. Only one unpacked row runs with ``is_causal`` and no mask.
    """
    packed = packing and method in PACKING_METHODS
    return packed or method == "prefix" or batch_size > 1


def activation_bytes(shape: ModelShape, method: str, *, batch_size: int, seq_len: int, precision: str,
                     gradient_checkpointing: bool, packing: bool, lora_r: int, lora_targets: str | list[str],
                     num_virtual_tokens: int, lora_experts: bool = False) -> int:
    """All saved activations at the end of the forward (the peak of the activation memory), plus what is alive
    with them: an exact-attention block's recomputed scores (Gemma 2, gpt-oss) and, for LoRA on experts, the
    merged expert weights PEFT's ParamWrapper builds in every forward (W + BA in the base dtype, kept for the
    input gradient)."""
    q_len, kv_len = sequence_lengths(method, seq_len, num_virtual_tokens)
    masked = attention_is_masked(method, batch_size=batch_size, packing=packing)
    per_layer = layer_activation_bytes(shape, method, precision=precision, q_len=q_len, kv_len=kv_len,
                                       masked=masked, lora_r=lora_r, lora_targets=lora_targets,
                                       lora_experts=lora_experts)
    r, h = residual_bytes(method, precision), shape.hidden_size
    e = 2 if precision == "bf16" else 4
    # Final norm: its fp32 input and the hidden rows kept for the chunked head.
    final = h * 4 + h * r
    extra = 0
    if shape.exact_attention:  # one block's fp32 scores, softmax and cast probabilities, and its bool mask
        extra += EXACT_BLOCK_ROWS * shape.num_heads * kv_len * (4 + 4 + e + 1)
    if method in ("lora", "qlora") and experts_train(shape, method, lora_experts):
        extra += shape.num_layers * shape.num_experts * sum(i * o for i, o in shape.expert_shapes().values()) * e
    if gradient_checkpointing:  # each layer keeps its input; one layer is live again while it is recomputed
        return int(batch_size * q_len * (shape.num_layers * h * r + per_layer + final) + extra)
    return int(batch_size * q_len * (shape.num_layers * per_layer + final) + extra)


def logits_bytes(shape: ModelShape, method: str, *, batch_size: int, seq_len: int, precision: str,
                 loss_chunk_size: int) -> int:
    """Transients of the chunked loss: (chunk, V) fp32 tensors, plus what the head adds at that moment."""
    chunk = min(batch_size * seq_len, loss_chunk_size)
    if method == "full":  # a trained head: checkpointed chunks, whose backward holds three fp32 copies
        chunk = min(chunk, TRAINED_HEAD_CHUNK_ROWS)
        per_position = shape.vocab_size * (4 * LOSS_CHUNK_COPIES + (2 if precision == "bf16" else 0))  # + bf16 logits
    else:  # a frozen head: the gradient is formed in the forward, from the fp32 logits and their log-softmax,
        # one block of rows at a time
        chunk = min(chunk, FROZEN_HEAD_BLOCK_ROWS)
        per_position = shape.vocab_size * 4 * FROZEN_HEAD_CHUNK_COPIES
    extra = 0
    if method == "full":
        extra = shape.head_params * 4  # the head's fp32 weight gradient
    return chunk * per_position + extra


def weight_bytes(shape: ModelShape, method: str, precision: str) -> int:
    if method == "full":  # fp32 masters
        return shape.num_params * 4
    if method == "qlora":
        unquantized = shape.num_params - shape.linear_params  # embeddings, norms, head: in the forward dtype
        return int(shape.linear_params * NF4_BYTES_PER_PARAM + unquantized * (2 if precision == "bf16" else 4))
    return shape.num_params * (2 if precision == "bf16" else 4)


def autocast_copy_bytes(shape: ModelShape, method: str, precision: str, trainable: int) -> int:
    """bf16 copies autocast caches of the trainable matmul weights, alive from the forward to their backward."""
    if precision != "bf16":
        return 0
    if method == "full":
        return (shape.linear_params + shape.expert_params + shape.head_params) * 2
    if method in ("lora", "qlora"):
        return trainable * 2
    return 0  # prompt and prefix parameters are not matmul weights


def flops_per_step(shape: ModelShape, method: str, *, batch_size: int, seq_len: int, num_virtual_tokens: int,
                   trainable: int, gradient_checkpointing: bool) -> float:
    """Forward + backward FLOPs of one micro-batch (see the module docstring)."""
    q_len, kv_len = sequence_lengths(method, seq_len, num_virtual_tokens)
    tokens, targets = batch_size * q_len, batch_size * seq_len
    layers = 2 * shape.active_params * tokens  # one pass of the decoder linears (an MoE token: its k experts)
    # QK^T and AV, forward; a sliding layer's queries see at most its window
    visible = (shape.num_layers - shape.sliding_layers) * kv_len
    visible += shape.sliding_layers * min(kv_len, shape.sliding_window or kv_len)
    attention = 4 * shape.num_heads * shape.head_dim * visible * tokens
    head = 2 * shape.head_params * targets
    flops = (layers + attention + head) + (layers + 2 * attention + head)  # forward; input gradients
    if shape.exact_attention:
        flops += attention  # the exact products' blocks are recomputed in backward
    if method == "full":
        flops += layers + head  # weight gradients
        flops += head  # the trained head's chunks are recomputed in backward
    if method in ("lora", "qlora"):
        flops += 6 * trainable * tokens  # an upper bound for LoRA on experts, whose delta is merged once per step
    if gradient_checkpointing:
        flops += layers + attention
    return float(flops)


# --------------------------------------------------------------------------------------------- estimate
@dataclass
class MemoryEstimate:
    """Predicted peak memory (bytes) of one training step, by part, and its FLOPs."""

    method: str
    trainable_params: int
    weights: int
    adapter: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    quantization_overhead: int
    runtime_overhead: int
    autocast_copies: int  # bf16 copies of trainable matmul weights, alive from the forward to their backward
    grad_accumulation: int  # end of backward: a trained tied embedding's second gradient and the sum of the two
    flops_per_step: float
    output_bytes: int  # what the run saves: a full model or an adapter

    @property
    def total(self) -> int:
        static = self.weights + self.adapter + self.optimizer_state + self.quantization_overhead + self.runtime_overhead
        return static + max(self.autocast_copies + self.activations + self.logits,
                            self.gradients + self.grad_accumulation)

    def rows(self) -> list[tuple[str, int]]:
        """(part, bytes) in the order the plan table prints them, the peak last."""
        return [("weights", self.weights), ("adapter", self.adapter), ("gradients", self.gradients),
                ("optimizer", self.optimizer_state), ("casts", self.autocast_copies),
                ("activations", self.activations), ("logits", self.logits),
                ("quantization", self.quantization_overhead), ("runtime", self.runtime_overhead),
                ("peak", self.total)]


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":  # as the engine: bf16 autocast on GPUs and on CPUs with native bf16, else fp32
        from posttrain.runtime import cpu_has_native_bf16

        return "bf16" if device == "cuda" or cpu_has_native_bf16() else "fp32"
    return precision


def estimate(shape: ModelShape, method: str, *, seq_len: int = 512, batch_size: int = 8, precision: str = "bf16",
             device: str = "cuda", lora_r: int = 16, lora_targets: str | list[str] = "all-linear",
             num_virtual_tokens: int = 20, gradient_checkpointing: bool = False, packing: bool = True,
             loss_chunk_size: int = 1024, lora_experts: bool = False) -> MemoryEstimate:
    """Peak memory and FLOPs of one training step of ``method`` on ``shape`` (see the module docstring)."""
    for key, value, allowed in (("method", method, METHODS), ("precision", precision, ("auto", "bf16", "fp32")),
                                ("device", device, ("cuda", "cpu"))):
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    precision = resolve_precision(precision, device)
    kw = dict(lora_r=lora_r, lora_targets=lora_targets, num_virtual_tokens=num_virtual_tokens, lora_experts=lora_experts)
    trainable = trainable_params(shape, method, **kw)
    compute_bytes = 2 if precision == "bf16" else 4
    quant = 0
    if method == "qlora":  # block constants, plus one linear dequantized for its matmul
        largest_linear = max(i * o for i, o in shape.linear_shapes().values())
        quant = int(shape.linear_params * DOUBLE_QUANT_BYTES_PER_PARAM) + largest_linear * compute_bytes
        if device == "cpu" and precision == "fp32" and shape.checkpoint_bytes_per_param == 4:
            # The fp32 embeddings and norms stay views of the mmapped fp32 checkpoint, so the file stays mapped and
            # the pages read while quantizing the linears stay resident: clean page cache, but counted in RSS.
            quant += shape.linear_params * 4
    return MemoryEstimate(
        method=method,
        trainable_params=trainable,
        weights=weight_bytes(shape, method, precision),
        adapter=0 if method == "full" else trainable * 4,
        gradients=trainable * 4,
        optimizer_state=trainable * 8,
        activations=activation_bytes(shape, method, batch_size=batch_size, seq_len=seq_len, precision=precision,
                                     gradient_checkpointing=gradient_checkpointing, packing=packing, **kw),
        logits=logits_bytes(shape, method, batch_size=batch_size, seq_len=seq_len, precision=precision,
                            loss_chunk_size=loss_chunk_size),
        quantization_overhead=quant,
        runtime_overhead=CUDA_RUNTIME_BYTES if device == "cuda" else CPU_RUNTIME_BYTES,
        autocast_copies=autocast_copy_bytes(shape, method, precision, trainable),
        grad_accumulation=grad_accumulation_bytes(shape, method),
        flops_per_step=flops_per_step(shape, method, batch_size=batch_size, seq_len=seq_len,
                                      num_virtual_tokens=num_virtual_tokens, trainable=trainable,
                                      gradient_checkpointing=gradient_checkpointing),
        output_bytes=shape.num_params * 4 if method == "full" else trainable * 4,
    )


# --------------------------------------------------------------------------------------------- the command
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
    table: bool = opt(False, "Print the 1B/7B/13B/65B/70B x method x 24/48/80 GB fit table (cuda, bf16) instead.")

    def validate(self) -> None:
        for key in ("seq_len", "batch_size", "loss_chunk_size", "lora_r", "num_virtual_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.device_memory_gb is not None and self.device_memory_gb <= 0:
            raise ConfigError(f"device_memory_gb: must be > 0, got {self.device_memory_gb}")
        lora_target_set(self.lora_targets)

    def settings(self) -> dict:
        """The keyword arguments of :func:`estimate`."""
        return dict(seq_len=self.seq_len, batch_size=self.batch_size, precision=self.precision, device=self.device,
                    lora_r=self.lora_r, lora_targets=self.lora_targets, num_virtual_tokens=self.num_virtual_tokens,
                    gradient_checkpointing=self.gradient_checkpointing, packing=self.packing,
                    loss_chunk_size=self.loss_chunk_size, lora_experts=self.lora_target_experts)


# Methods in the order the recommendation tries them: cheapest step first. lora, qlora, prefix and prompt all
# cost ~4N FLOPs per token; among them a higher performance ceiling goes first, and QLoRA follows LoRA because
# it dequantizes every base weight in every matmul (slower steps for less memory). Full FT (6N) comes last.
RECOMMENDATION_ORDER = ("lora", "qlora", "prefix", "prompt", "full")

# (performance ceiling, risk of forgetting), with sources.
TRADE_OFFS = {
    "full": ("highest: every weight adapts",
             "highest: every weight moves (Biderman et al. 2024, 'LoRA Learns Less and Forgets Less')"),
    "lora": ("close to full FT on instruction tuning, below it on large domain shifts such as code or math (Biderman et al. 2024)",
             "low: the base stays frozen and the update is low-rank"),
    "qlora": ("as 16-bit LoRA (Dettmers et al. 2023, Guanaco)",
              "low, as LoRA; the 4-bit base adds a small quantization error"),
    "prefix": ("below LoRA; competitive on generation tasks (Li & Liang 2021)",
               "lowest: the base is untouched and the adapter can be removed"),
    "prompt": ("lowest; reaches fine-tuning quality only near 10B+ parameters (Lester et al. 2021)",
               "lowest: the base is untouched and the adapter can be removed"),
}


def human_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GB"
    if n >= MiB:
        return f"{n / MiB:.0f} MB"
    return f"{n / 1024:.0f} KB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), *(line(r) for r in rows)])


def format_estimates(shape: ModelShape, estimates: list[MemoryEstimate], cfg: PlanConfig, budget: int | None) -> str:
    precision = resolve_precision(cfg.precision, cfg.device)
    head = (f"model {shape.name}: {human_count(shape.num_params)} parameters ({shape.source})\n"
            + "".join(f"  {line}\n" for line in shape.features()) +
            f"device {cfg.device}, precision {precision}, {cfg.batch_size} rows x {cfg.seq_len} tokens, "
            f"packing {'on' if cfg.packing else 'off'}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")
    header = ["method", "trainable", *(label for label, _ in estimates[0].rows()), "fits", "TFLOP/step", "saves"]
    rows = []
    for est in estimates:
        fits = "-" if budget is None else ("yes" if est.total <= budget else "no")
        rows.append([est.method, human_count(est.trainable_params), *(human_bytes(b) for _, b in est.rows()), fits,
                     f"{est.flops_per_step / 1e12:.2f}", human_bytes(est.output_bytes)])
    note = ("peak = weights + adapter + optimizer + quantization + runtime + max(casts + activations + logits, "
            "gradients + tied-embedding gradient sum): backward frees activations as it makes gradients; fused AdamW "
            "steps in place")
    return f"{head}\n\n{_table(header, rows)}\n\n{note}"


def recommend(estimates: list[MemoryEstimate], budget: int) -> str:
    """The cheapest method that fits ``budget`` bytes, and the trade-offs of every planned method."""
    by_method = {e.method: e for e in estimates}
    fitting = [by_method[m] for m in RECOMMENDATION_ORDER if m in by_method and by_method[m].total <= budget]
    lines = []
    if fitting:
        best = fitting[0]
        lines.append(f"recommended: {best.method} (peak {human_bytes(best.total)} of {human_bytes(budget)}): of the methods "
                     "that fit, the cheapest step, and among equally cheap ones the highest performance ceiling")
    else:
        smallest = min(estimates, key=lambda e: e.total)
        lines.append(f"nothing planned fits {human_bytes(budget)}; the smallest is {smallest.method} at "
                     f"{human_bytes(smallest.total)}: try gradient_checkpointing=true, a smaller batch_size or seq_len")
    lora_flops = by_method["lora"].flops_per_step if "lora" in by_method else None
    lines.append("trade-offs:")
    for est in estimates:
        ceiling, forgetting = TRADE_OFFS[est.method]
        cost = f"{est.flops_per_step / 1e12:.2f} TFLOP/step"
        if lora_flops and est.method != "lora":
            cost += f" ({est.flops_per_step / lora_flops:.2f}x lora)"
        output = "a full model" if est.method == "full" else "an adapter"
        lines.append(f"  {est.method:<7} compute {cost}; saves {output} of {human_bytes(est.output_bytes)}; "
                     f"ceiling {ceiling}; forgetting {forgetting}")
    return "\n".join(lines)


TABLE_MODELS = ("1b", "7b", "13b", "65b", "70b")
TABLE_GPUS_GB = (24, 48, 80)


def fit_table(cfg: PlanConfig) -> tuple[str, list[MemoryEstimate]]:
    """Which method fits which GPU, for Llama sizes, on CUDA in bf16 at cfg's batch and length.

    A cell reads 'yes' (fits), 'gc' (fits only with gradient checkpointing) or '-'.
    """
    base = {**cfg.settings(), "device": "cuda", "precision": "bf16"}
    rows, estimates = [], []
    for name in TABLE_MODELS:
        shape = KNOWN_SHAPES[name]
        for method in METHODS:
            plain = estimate(shape, method, **base)
            with_gc = estimate(shape, method, **{**base, "gradient_checkpointing": True})
            estimates.append(plain)
            cells = ["yes" if plain.total <= gb * GiB else "gc" if with_gc.total <= gb * GiB else "-" for gb in TABLE_GPUS_GB]
            rows.append([name, method, human_bytes(plain.total), human_bytes(with_gc.total), *cells])
    header = ["model", "method", "peak", "peak (gc)", *(f"{gb} GB" for gb in TABLE_GPUS_GB)]
    title = (f"fit on one GPU (cuda, bf16, {cfg.batch_size} rows x {cfg.seq_len} tokens, lora r {cfg.lora_r}): "
             "'yes' fits, 'gc' fits with gradient_checkpointing=true, '-' does not")
    return f"{title}\n\n{_table(header, rows)}", estimates


def device_memory(cfg: PlanConfig) -> int | None:
    """Bytes to fit in: device_memory_gb, else the visible GPU's or the machine's RAM; None if unknown."""
    if cfg.device_memory_gb is not None:
        return int(cfg.device_memory_gb * GiB)
    if cfg.device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def run_plan(cfg: PlanConfig) -> list[MemoryEstimate]:
    """Print the plan (or the fit table) and return the estimates it printed."""
    cfg.validate()
    if cfg.table:
        text, estimates = fit_table(cfg)
        print(text)
        return estimates
    shape = load_shape(cfg.model)
    methods = METHODS if cfg.method == "all" else (cfg.method,)
    estimates = [estimate(shape, m, **cfg.settings()) for m in methods]
    budget = device_memory(cfg)
    print(format_estimates(shape, estimates, cfg, budget))
    print()
    print(recommend(estimates, budget) if budget is not None else "no GPU visible: set device_memory_gb for a recommendation")
    return estimates
