"""Model shapes for the planner: the dimensions that memory and FLOPs depend on, built in for popular models
(no download) or read from a local HF directory."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import ConfigError

GiB = 2**30
MiB = 2**20


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


