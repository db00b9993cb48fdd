"""The planner's analytical model: the peak memory and the FLOPs of a training step, per method.

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
Several processes (``processes=N``, per process; :func:`per_process`). ``strategy=ddp``: every process holds all of
the above, plus DDP's gradient buckets (a flat copy of the trainable gradients, 4 B/param, that all-reduce works
in). ``strategy=fsdp`` (FSDP2, engine/sharding.py): weights, adapter, gradients and optimizer state are divided by
N; added are the gathered units: the root unit (embeddings, final norm, an untied head), kept whole from the
forward to the end of backward, and two decoder layers (the one computing and the one FSDP2 prefetches), each
gathered in its stored dtype; and, at the end of backward, the root's whole gradient before its reduce-scatter
(full fine-tuning: the embedding's). QLoRA's NF4 linears are not sharded (their quantisation state lives outside
the tensor): they stay whole on every process, the rest is sharded. With ``offload`` (GPUs), the sharded parameters, gradients and optimizer
state live in CPU memory and leave the device's count.
docs/plan.md gives the derivation, the sources and the calibration against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.errors import ConfigError
from posttrain.methods import METHODS, PACKING_METHODS
from posttrain.plan.shapes import MiB, ModelShape

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
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3
ATTENTION_INPUT = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj"})  # linears that read the attention input
MLP_INPUT = frozenset({"gate_proj", "up_proj", "gate_up_proj"})  # linears that read the MLP input
EXACT_BLOCK_ROWS = 128  # models/attention.py: query rows per checkpointed block of the exact products


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
                     num_virtual_tokens: int, lora_experts: bool = False, fused_swiglu: bool = False) -> int:
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
                           lora_r: int, lora_targets: str | list[str], lora_experts: bool = False,
                           fused_swiglu: bool = False) -> float:
    """Bytes autograd keeps per query token for one HF ``LlamaDecoderLayer`` with SDPA attention.

    Korthikanti et al.'s per-layer count (34 h per token at 2 bytes, plus 5as for the scores), redone for the
    Llama block with e = bytes per activation element:
      RMSNorm x2        input, in the residual stream's dtype: 2 * h * 4 (fp32, or full fine-tuning's fp32 stream)
                        or 2 * h * 2 (a bf16 base); models/fused_norm.py keeps the input itself and no
                        normalised copy, where the eager module would keep its fp32 upcast
      linear inputs     see :func:`linear_input_bytes`: kept only for linears that train or carry LoRA (a frozen
                        linear needs only its weight in backward)
      SwiGLU            3 * f * e: the gate output, silu(gate) and the up output; 2 * f * e with
                        models/fused_mlp.py's fused node (fp32 on a CPU with AVX2: ``fused_swiglu``)
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
        per_token += (2 if fused_swiglu else 3) * f * e
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
                     num_virtual_tokens: int, lora_experts: bool = False, fused_swiglu: bool = False) -> int:
    """All saved activations at the end of the forward (the peak of the activation memory), plus what is alive
    with them: an exact-attention block's recomputed scores (Gemma 2, gpt-oss) and, for LoRA on experts, the
    merged expert weights PEFT's ParamWrapper builds in every forward (W + BA in the base dtype, kept for the
    input gradient)."""
    q_len, kv_len = sequence_lengths(method, seq_len, num_virtual_tokens)
    masked = attention_is_masked(method, batch_size=batch_size, packing=packing)
    per_layer = layer_activation_bytes(shape, method, precision=precision, q_len=q_len, kv_len=kv_len,
                                       masked=masked, lora_r=lora_r, lora_targets=lora_targets,
                                       lora_experts=lora_experts, fused_swiglu=fused_swiglu)
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
    processes: int = 1
    strategy: str = "ddp"
    communication: int = 0  # ddp: gradient buckets; fsdp: the gathered root unit and two layers
    unsharded_grads: int = 0  # fsdp: the root's whole gradient at the end of backward, before its reduce-scatter

    @property
    def total(self) -> int:
        static = (self.weights + self.adapter + self.optimizer_state + self.quantization_overhead + self.runtime_overhead
                  + self.communication)
        return static + max(self.autocast_copies + self.activations + self.logits,
                            self.gradients + self.grad_accumulation + self.unsharded_grads)

    def rows(self) -> list[tuple[str, int]]:
        """(part, bytes) in the order the plan table prints them, the peak last."""
        return [("weights", self.weights), ("adapter", self.adapter), ("gradients", self.gradients),
                ("optimizer", self.optimizer_state), ("casts", self.autocast_copies),
                ("activations", self.activations), ("logits", self.logits),
                ("quantization", self.quantization_overhead), ("runtime", self.runtime_overhead),
                ("comm", self.communication + self.unsharded_grads), ("peak", self.total)]


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
                                     gradient_checkpointing=gradient_checkpointing, packing=packing,
                                     fused_swiglu=fused_swiglu_expected(shape, device, precision), **kw),
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



# families whose MLP is Llama's SiLU-gated one, which models/fused_mlp.py routes (Gemma's is GELU, Phi-3 fuses gate+up)
_LLAMA_SILU_MLP = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite"})


def fused_swiglu_expected(shape: ModelShape, device: str, precision: str) -> bool:
    """Whether training will run models/fused_mlp.py's fused SwiGLU (which keeps no silu(gate)): fp32 on a CPU
    with AVX2, FMA and a C++ compiler (the kernel is built on first use; checked here without building it), a
    dense Llama-form SiLU MLP, kernels not switched off."""
    import os
    import shutil

    from posttrain.models import native

    return (device == "cpu" and precision == "fp32" and not shape.num_experts and shape.model_type in _LLAMA_SILU_MLP
            and os.environ.get("POSTTRAIN_CPU_KERNELS", "1") != "0" and native._cpu_has_avx2_fma()
            and shutil.which(os.environ.get("CXX", "g++")) is not None)


STRATEGIES = ("ddp", "fsdp")
SHARDABLE = ("full", "lora", "qlora")  # the methods posttrain shards with FSDP2 (engine/sharding.check)


def per_process(est: MemoryEstimate, shape: ModelShape, *, processes: int, strategy: str = "ddp",
                offload: bool = False, precision: str = "bf16") -> MemoryEstimate:
    """``est`` (one process) as the peak of each of ``processes`` processes under ``strategy`` (module docstring);
    ``precision``: the resolved one (bf16 or fp32) the estimate was made with."""
    import dataclasses

    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if processes < 1:
        raise ConfigError(f"processes: must be >= 1, got {processes}")
    if offload and strategy != "fsdp":
        raise ConfigError("offload: only with strategy=fsdp (FSDP2's CPUOffloadPolicy)")
    if strategy == "fsdp" and est.method not in SHARDABLE:
        raise ConfigError(f"strategy=fsdp: posttrain does not shard method {est.method} (see distributed.strategy)")
    if strategy == "ddp":
        buckets = est.gradients if processes > 1 else 0
        return dataclasses.replace(est, processes=processes, strategy=strategy, communication=buckets)
    n = processes
    stored = 4 if est.method == "full" else (2 if precision == "bf16" else 4)  # fp32 master / the frozen base's dtype
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_embeddings else 2)
    root = embeddings + shape.hidden_size
    layer = (shape.num_params - root) // max(shape.num_layers, 1)
    gathered = (root + 2 * layer) * stored
    root_grad = embeddings * 4 if est.method == "full" else 0
    shard = 0 if offload else 1  # offloaded: the sharded state is in CPU memory, not on the device
    weights = est.weights * shard // n
    if est.method == "qlora":  # the NF4 linears stay whole on every process; the rest is sharded
        nf4 = int(shape.linear_params * NF4_BYTES_PER_PARAM)
        weights = nf4 + (est.weights - nf4) * shard // n
        gathered = (root + 2 * (layer - shape.linear_params // max(shape.num_layers, 1))) * stored
    return dataclasses.replace(
        est, processes=n, strategy=strategy, weights=weights, adapter=est.adapter * shard // n,
        gradients=est.gradients * shard // n, optimizer_state=est.optimizer_state * shard // n,
        communication=gathered, unsharded_grads=root_grad)  # the tied embedding's gradient sum stays whole
