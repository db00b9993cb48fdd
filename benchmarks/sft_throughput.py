"""SFT throughput: posttrain against TRL's ``SFTTrainer``, side by side in one run.

    python benchmarks/sft_throughput.py                  # CPU default: LoRA, posttrain vs TRL's best, ~15 min
    python benchmarks/sft_throughput.py --methods lora,qlora,full --tools posttrain,trl --out DIR
    python benchmarks/sft_throughput.py --repeat 3       # 3 interleaved rounds: median tokens/s and ratios
    bash benchmarks/gpu.sh                               # the same on one CUDA GPU, in its own venv

Every run trains the same model on the same generated chat data (``messages`` rows, loss on the assistant
turns including their end-of-turn token) with the same LoRA config (r 16 on all linear layers, alpha 32,
dropout 0), max_length 512, batch 8, constant learning rate, no weight decay, gradient clipping at 1.0, and
the same budget of trained tokens. Runs differ only in the tool and its speed settings:

- ``posttrain``: its defaults, ``packing=true``, ``precision=auto`` (bf16 on GPUs, fp32 on CPU), no
  gradient checkpointing; run through the public API (``sft.train(load_config(...))``).
- ``trl-default``: ``SFTTrainer`` at its defaults: no packing, gradient checkpointing on, bf16 if the
  hardware has it (see ``--trl-bf16``).
- ``trl-best``: ``packing=True, padding_free=True, gradient_checkpointing=False``, bf16 as above, and
  FlashAttention 2 on CUDA when ``flash_attn`` is installed.

TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers that SmolLM2's ChatML template lacks (TRL
cannot patch that template), so TRL runs get :data:`CHATML_TRAINING_TEMPLATE`, which renders the same text
with markers around each assistant reply and its ``<|im_end|>\\n``: exactly posttrain's assistant spans. The
TRL child checks that its rendering is byte-identical, and the report compares the trained tokens of TRL's
prepared (unpacked) data with posttrain's count.

Each run is its own subprocess, so peak RSS (and peak CUDA memory) are per run. Only steady-state steps are
timed: the first ``--warmup`` optimizer steps are dropped. "Tokens" are trained tokens (targets of the loss),
counted the same way for both tools. MFU counts useful FLOPs (see :func:`flops_per_trained_token`) against a
2048x2048 matmul of the run's compute dtype timed in the same process just before training.

``--repeat N`` runs every (method, tool) run N times, interleaved so that slow drift in the machine's speed
spreads over every tool: each round runs each tool once for a method, in the given order on odd rounds and
reversed on even ones (see :func:`run_order`). Every round's result is kept (``runs[].repeats`` in
results.json); the tables and targets report the median tokens/s, MFU and losses over the rounds, the max
peak memory, and posttrain's speed-up as the median of the per-round ratios (posttrain / that tool in the
same round), with their min and max (see :func:`combine_repeats`). ``--repeat 1`` (the default) is one plain
run of each.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SETUPS = ("posttrain", "trl-default", "trl-best")
METHODS = ("lora", "qlora", "full")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}
IGNORE_INDEX = -100

# SmolLM2's ChatML template (same text, same default system turn) with TRL's generation markers around each
# assistant reply and its end-of-turn: the tokens posttrain trains on.
CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ============================================================================================== data
_WORDS = (
    "amber anchor apple arrow autumn badge bamboo basket beacon berry blossom bridge bronze butter cabin "
    "candle canyon carbon castle cedar chalk cherry cinder circle clover cobalt comet copper coral cotton "
    "crystal dagger delta desert diamond dolphin dragon ember falcon feather fern fiddle flame forest fossil "
    "garden garnet ginger glacier granite harbor hazel helmet hollow honey island ivory jasmine jungle kettle "
    "lantern lemon lilac linen lotus magnet maple marble meadow mirror monsoon mosaic nectar nickel oasis "
    "olive onyx orchid otter paddle pebble pepper pillar pine planet pocket prism quartz quill raven reef "
    "ribbon river rocket saddle saffron salmon sapphire scarlet shadow silver spruce summit tango thistle "
    "thunder timber topaz tulip tundra velvet violet walnut willow winter zephyr"
).split()
_SYSTEMS = (
    "You are a precise assistant. Follow list instructions exactly and answer with the list only.",
    "You are a careful data clerk who never skips an item.",
)


# Approximate SmolLM2 tokens per list item (prompt + answer) of each task kind, to size lists by token budget.
_TOKENS_PER_ITEM = {"sort": 5.5, "reverse": 5.7, "upper": 9.8, "add": 18.1}


def _task(rng: random.Random, kind: str, n_items: int) -> tuple[str, str]:
    """One (instruction, answer) pair over ``n_items`` list items; answers are fully determined by the prompt."""
    if kind == "add":
        numbers = [rng.randrange(1, 1000) for _ in range(n_items)]
        step = rng.randrange(2, 50)
        prompt = f"Add {step} to each of these numbers and show each sum: " + ", ".join(map(str, numbers))
        return prompt, "\n".join(f"{n} + {step} = {n + step}" for n in numbers)
    words = [rng.choice(_WORDS) for _ in range(n_items)]
    listed = ", ".join(words)
    if kind == "sort":
        return f"Sort these words alphabetically, one per line: {listed}", "\n".join(sorted(words))
    if kind == "reverse":
        return f"Reverse the order of this list, one word per line: {listed}", "\n".join(reversed(words))
    return (f"Write each word in upper case with its letter count, one per line: {listed}",
            "\n".join(f"{w.upper()} ({len(w)})" for w in words))


def make_conversations(n: int, seed: int) -> list[dict]:
    """``n`` chat rows in ``messages`` format: median ~210 tokens, a long tail to ~900 (SmolLM2 tokenizer).

    Each row draws a log-normal token budget for its list content, which gives the variable lengths real
    chat data has; a third of the rows have a system turn, a quarter have two user/assistant exchanges.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        # list tokens (the template adds ~40), capped so the longest rows have ~900 tokens
        budget = min(850.0, math.exp(rng.gauss(math.log(172), 0.55)))
        turns = 2 if rng.random() < 0.25 else 1
        messages = [{"role": "system", "content": rng.choice(_SYSTEMS)}] if rng.random() < 0.33 else []
        for _ in range(turns):
            kind = rng.choice(list(_TOKENS_PER_ITEM))
            items = max(2, round(budget / turns / _TOKENS_PER_ITEM[kind]))
            prompt, answer = _task(rng, kind, items)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@dataclass
class DataStats:
    """Token statistics of the training rows as posttrain tokenizes them (after truncation to max_length)."""

    rows: int
    median_tokens: float
    p90_tokens: float
    max_tokens_before_truncation: int
    truncated_rows: int
    processed_tokens: int  # every non-padding token: what the model body computes on
    trained_tokens: int  # targets of the loss
    sum_sq_lengths: int  # for attention FLOPs: each example attends only within itself
    packed_rows: int  # rows of max_length after first-fit-decreasing packing (token budget estimate)


def tokenize_like_posttrain(path: Path, model_dir: str, max_length: int) -> tuple[list, int, int]:
    """posttrain's own tokenization of a data file: (examples, rows truncated, longest row before truncation)."""
    from posttrain.data.dataset import load_sft_dataset
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    full, _ = load_sft_dataset(path, tokenizer, max_length=10**6)
    kept, _ = load_sft_dataset(path, tokenizer, max_length=max_length)
    lengths = [len(e.input_ids) for e in full]
    return kept, sum(n > max_length for n in lengths), max(lengths)


def data_stats(examples: list, truncated: int, longest: int, max_length: int) -> DataStats:
    lengths = sorted(len(e.input_ids) for e in examples)
    rooms: list[int] = []  # first-fit decreasing: good enough to size the token budget
    for n in sorted(lengths, reverse=True):
        for i, room in enumerate(rooms):
            if room >= n:
                rooms[i] -= n
                break
        else:
            rooms.append(max_length - n)
    return DataStats(
        rows=len(lengths),
        median_tokens=statistics.median(lengths),
        p90_tokens=lengths[int(0.9 * (len(lengths) - 1))],
        max_tokens_before_truncation=longest,
        truncated_rows=truncated,
        processed_tokens=sum(lengths),
        # position 0 never has a predecessor, so it is never a target (same rule as both tools' label shift)
        trained_tokens=sum(sum(e.loss_mask[1:]) for e in examples),
        sum_sq_lengths=sum(n * n for n in lengths),
        packed_rows=len(rooms),
    )


# ============================================================================================== FLOPs
@dataclass
class ModelShape:
    layers: int
    hidden: int
    attn_dim: int  # heads x head_dim
    body_params: int  # matmul weights of the decoder layers
    head_params: int  # the output projection (vocab x hidden)
    lora_params: int  # LoRA A and B on every linear layer of the body

    @classmethod
    def from_config(cls, config: dict, lora_r: int) -> ModelShape:
        h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or h // heads
        kv = config.get("num_key_value_heads", heads) * head_dim
        q = heads * head_dim
        # (in, out) of q, k, v, o, gate, up, down
        linears = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
        return cls(
            layers=layers, hidden=h, attn_dim=q,
            body_params=layers * sum(i * o for i, o in linears),
            head_params=config["vocab_size"] * h,
            lora_params=layers * sum(lora_r * (i + o) for i, o in linears),
        )


def flops_per_trained_token(shape: ModelShape, stats: DataStats, method: str) -> float:
    """Useful training FLOPs per trained token, averaged over the data.

    - Body matmuls: 6 FLOPs per parameter per processed token for full fine-tuning (forward 2, input grads
      2, weight grads 2); 4 for frozen-base methods (no weight grads), plus 6 per LoRA parameter.
    - Output projection: only at trained positions (both tools skip the other positions), same factors.
    - Attention (QK^T and AV, causal, within each example): 2 * attn_dim * L^2 per layer forward, x3 for
      training. Gradient-checkpointing recompute and padding are not useful work and are not counted.
    """
    k = 6 if method == "full" else 4
    body = k * shape.body_params * stats.processed_tokens
    if method != "full":
        body += 6 * shape.lora_params * stats.processed_tokens
    head = k * shape.head_params * stats.trained_tokens
    attention = 3 * 2 * shape.layers * shape.attn_dim * stats.sum_sq_lengths
    return (body + head + attention) / stats.trained_tokens


# ============================================================================================== measuring
def matmul_peak(dtype_name: str, device: str, size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a size x size matmul in ``dtype_name``: best of repeats within ~``seconds``.

    Timed through ``F.linear`` (x @ w.T), the kernel ``nn.Linear`` runs: on CPUs without native bf16,
    ``torch.mm`` in bf16 falls back to a path tens of times slower than the oneDNN one ``F.linear`` takes.
    """
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    F.linear(a, b)
    sync()
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 3 or (spent < seconds and reps < 50):
        t0 = time.perf_counter()
        F.linear(a, b)
        sync()
        elapsed = time.perf_counter() - t0
        best, spent, reps = min(best, elapsed), spent + elapsed, reps + 1
    return 2 * size**3 / best


def weight_bytes(model) -> dict[str, int]:
    """Weights as stored: frozen and trainable bytes, and the 4-bit ones apart (with their quantization constants).

    bitsandbytes' ``Params4bit`` holds two 4-bit values per uint8 element; its ``quant_state`` holds the
    per-block absmax (itself quantized, with its own constants, under double quantization).
    """
    out = dict.fromkeys(("frozen_bytes", "frozen_params", "trainable_bytes", "quantized_bytes", "quantized_params"), 0)
    for p in model.parameters():
        n_bytes, n_params = p.numel() * p.element_size(), p.numel()
        state = getattr(p, "quant_state", None)
        if state is not None:
            n_params *= 2
            n_bytes += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                n_bytes += state.state2.absmax.numel() * state.state2.absmax.element_size()
            out["quantized_bytes"] += n_bytes
            out["quantized_params"] += n_params
        if p.requires_grad:
            out["trainable_bytes"] += n_bytes
        else:
            out["frozen_bytes"] += n_bytes
            out["frozen_params"] += n_params
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def eval_loss(model, eval_examples: list[dict], device: str) -> float:
    """Mean NLL over the trained tokens of fixed held-out rows, computed identically for every run."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in eval_examples:
            ids = torch.tensor([ex["input_ids"]], device=device)  # (1, T)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
            mask = torch.tensor(ex["loss_mask"][1:], dtype=torch.bool, device=device)  # (T-1,)
            total += float(F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum"))
            count += int(mask.sum())
    return total / max(count, 1)


# ============================================================================================== runs
@dataclass
class RunSpec:
    setup: str
    method: str
    model_dir: str
    device: str
    train_file: str
    eval_file: str
    workdir: str  # where the run's spec, log, result (and profile) go
    scratch: str  # where its trainer writes checkpoints and the saved model; deleted after the benchmark
    steps: int  # optimizer steps in total, warmup included
    batch_size: int
    max_length: int
    warmup: int
    bf16: bool  # mixed precision bf16 (posttrain decides for itself via precision=auto)
    seed: int
    peak_size: int
    profile: bool = False  # posttrain runs: torch.profiler over the first timed step


def _step_records(trained: list[int], seconds: list[float], losses: list[float]) -> list[dict]:
    return [{"step": i + 1, "trained_tokens": t, "seconds": s, "loss": loss}
            for i, (t, s, loss) in enumerate(zip(trained, seconds, losses))]


def run_posttrain(spec: RunSpec) -> dict:
    from posttrain.commands import load_config
    from posttrain.stages import sft

    overrides = [
        f"model={spec.model_dir}", f"method={spec.method}", f"data.train={spec.train_file}",
        f"output_dir={spec.scratch}", f"max_steps={spec.steps}", f"batch_size={spec.batch_size}",
        f"max_length={spec.max_length}", f"lr={LEARNING_RATE[spec.method]}", "lr_scheduler=constant", "warmup_ratio=0",
        "weight_decay=0", "max_grad_norm=1.0", f"seed={spec.seed}", "log_every=1", "tensorboard=false",
        f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}",
        "lora.target_modules=all-linear", "packing=true", "precision=auto", "gradient_checkpointing=false",
    ]
    cfg = load_config("sft", None, overrides)
    from posttrain.runtime import resolve_mixed_precision

    # what precision=auto trains in: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32
    dtype = "bf16" if resolve_mixed_precision("auto") == "bf16" else "fp32"
    peak = matmul_peak(dtype, spec.device, spec.peak_size)
    if spec.profile:
        result = _profiled(lambda: sft.train(cfg), spec)
    else:
        result = sft.train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/units" in r]
    trained = [int(r["train/units"]) for r in rows]
    seconds = [r["train/units"] / r["train/units_per_s"] for r in rows]
    return {
        "compute_dtype": dtype, "matmul_peak_flops": peak,
        "settings": {"overrides": overrides},
        "step_records": _step_records(trained, seconds, [r["train/loss"] for r in rows]),
        "model": result.model,
    }


def _profiled(train, spec: RunSpec):
    """Run ``train()`` with torch.profiler recording its first timed optimizer step into profile.txt.

    A global optimizer-step hook advances the profiler schedule, so the recorded window is exactly one
    training step (data collation, forward, backward, clipping, AdamW), with no posttrain internals involved.
    """
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec.device == "cuda" else [])
    plan = schedule(wait=max(spec.warmup - 1, 0), warmup=min(spec.warmup, 1), active=1, repeat=1)
    with profile(activities=activities, schedule=plan) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        try:
            result = train()
        finally:
            hook.remove()
    sort = "self_cuda_time_total" if spec.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)
    (Path(spec.workdir) / "profile.txt").write_text(
        f"torch {torch.__version__}, {spec.method}, optimizer step {spec.warmup + 1} of {spec.steps}\n{table}")
    return result


def _trl_tokenizer(model_dir: str, rows: list[dict]):
    """The model's tokenizer with the ChatML training template, checked to render every row identically."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    original = tokenizer.chat_template
    for row in rows:
        mine = tokenizer.apply_chat_template(row["messages"], tokenize=False, chat_template=CHATML_TRAINING_TEMPLATE)
        theirs = tokenizer.apply_chat_template(row["messages"], tokenize=False, chat_template=original)
        if mine != theirs:
            raise ValueError("this benchmark's training template (ChatML with {% generation %} markers) does not "
                             f"render like {model_dir}'s own template; TRL's assistant_only_loss would need another one")
    tokenizer.chat_template = CHATML_TRAINING_TEMPLATE
    return tokenizer


def run_trl(spec: RunSpec) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = read_jsonl(Path(spec.train_file))
    tokenizer = _trl_tokenizer(spec.model_dir, rows)
    best = spec.setup == "trl-best"
    dtype = torch.bfloat16 if spec.bf16 else torch.float32
    init = {"dtype": dtype if spec.method == "qlora" else torch.float32, "attn_implementation": "sdpa"}
    if best and spec.device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        init["attn_implementation"] = "flash_attention_2"
    if spec.method == "qlora":
        init["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
        init["device_map"] = {"": spec.device}
    speed = {"packing": True, "padding_free": True, "gradient_checkpointing": False} if best else {}
    args = SFTConfig(
        output_dir=spec.scratch, max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
        max_length=spec.max_length, learning_rate=LEARNING_RATE[spec.method], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=spec.seed, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=spec.device == "cpu", bf16=spec.bf16,
        assistant_only_loss=True, model_init_kwargs=init, **speed,
    )
    peft_config = None
    if spec.method != "full":
        peft_config = LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                 lora_dropout=LORA["dropout"], target_modules="all-linear")

    class StepClock(TrainerCallback):
        """Wall time between consecutive optimizer-step ends (data loading included), and per-step loss."""

        def __init__(self):
            self.ends: list[float] = [time.perf_counter()]
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if spec.device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class CountingSFTTrainer(SFTTrainer):
        """Counts the trained tokens of each batch the way posttrain does: targets after the label shift."""

        trained: list[int] = []

        def training_step(self, model, inputs, *args, **kwargs):
            self.trained.append(int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    clock = StepClock()
    trainer = CountingSFTTrainer(model=spec.model_dir, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[clock])
    prepared_trained = sum(sum(t != IGNORE_INDEX for t in r["labels"][1:]) for r in trainer.train_dataset) \
        if not best else None
    peak = matmul_peak("bf16" if spec.bf16 else "fp32", spec.device, spec.peak_size)
    clock.ends = [time.perf_counter()]
    trainer.train()
    seconds = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    return {
        "compute_dtype": "bf16" if spec.bf16 else "fp32", "matmul_peak_flops": peak,
        "settings": {"attn_implementation": init["attn_implementation"], "bf16": spec.bf16,
                     "gradient_checkpointing": args.gradient_checkpointing, "packing": args.packing,
                     "padding_free": args.padding_free, "assistant_only_loss": True},
        "prepared_trained_tokens": prepared_trained,
        "step_records": _step_records(trainer.trained, seconds, clock.losses),
        "model": trainer.model,
    }


def child_main(spec_path: Path) -> None:
    """Run one spec in this process and write its result next to the spec."""
    import torch

    spec = RunSpec(**json.loads(spec_path.read_text()))
    torch.manual_seed(spec.seed)
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = run_posttrain(spec) if spec.setup == "posttrain" else run_trl(spec)
    model = out.pop("model")
    weights = weight_bytes(model)
    eval_examples = read_jsonl(Path(spec.eval_file))
    out.update(
        setup=spec.setup, method=spec.method, device=spec.device,
        eval_loss=eval_loss(model, eval_examples, spec.device),
        peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if spec.device == "cuda" else None,
        frozen_weight_mb=weights["frozen_bytes"] / 2**20, weights=weights,
        wall_seconds=time.perf_counter() - started,
    )
    (spec_path.parent / "result.json").write_text(json.dumps(out, indent=2))


# ============================================================================================== summary
def summarize(result: dict, warmup: int, flops_per_token: float) -> dict:
    """Steady-state numbers of one run: trained tokens/s over the steps after warmup, MFU, losses."""
    steps = result["step_records"]
    timed = steps[warmup:]
    tokens = sum(s["trained_tokens"] for s in timed)
    seconds = sum(s["seconds"] for s in timed)
    tok_s = tokens / seconds if seconds > 0 else float("nan")
    achieved = tok_s * flops_per_token
    return {
        "steps_total": len(steps), "steps_timed": len(timed), "timed_seconds": seconds,
        "trained_tokens_per_s": tok_s, "achieved_tflops": achieved / 1e12,
        "mfu": achieved / result["matmul_peak_flops"],
        "tokens_seen": sum(s["trained_tokens"] for s in steps),
        "last_train_loss": steps[-1]["loss"] if steps else float("nan"),
    }


# ============================================================================================== rounds (--repeat)
def round_order(setups: list[str], round_no: int) -> list[str]:
    """The setups in the order round ``round_no`` (from 1) runs them: as given on odd rounds, reversed on even
    ones, so that no setup always goes first."""
    return list(setups) if round_no % 2 else list(reversed(setups))


def run_order(methods: list[str], setups: list[str], repeat: int) -> list[tuple[str, int, str]]:
    """(method, round, setup) of every run, in the order they run: a method's rounds back to back, each round
    running every setup once (see :func:`round_order`). ``repeat`` 1 is the plain methods x setups order."""
    return [(method, round_no, setup) for method in methods for round_no in range(1, repeat + 1)
            for setup in round_order(setups, round_no)]


def speedup_over_rounds(ours: dict[int, float], theirs: dict[int, float]) -> dict | None:
    """posttrain's speed-up over another setup from each one's tokens/s per round (round -> tokens/s).

    The ratio is taken within each round both finished (the two ran minutes apart, under the same drift), then
    summarised by the median, min and max of those ratios; None when no round has both.
    """
    per_round = [{"round": k, "ratio": ours[k] / theirs[k]} for k in sorted(ours.keys() & theirs.keys())
                 if theirs[k] > 0 and math.isfinite(ours[k] / theirs[k])]
    if not per_round:
        return None
    ratios = [p["ratio"] for p in per_round]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios),
            "per_round": per_round}


# Summary fields that are rates or losses (medians over rounds); the others are counts, the same every round.
_MEDIAN_SUMMARY_KEYS = ("timed_seconds", "trained_tokens_per_s", "achieved_tflops", "mfu", "last_train_loss")


def combine_rounds(records: list[dict]) -> dict:
    """One (method, setup)'s per-round records (each with its ``round``) as one record for the table and targets.

    Over the rounds that finished: tokens/s, achieved FLOP/s, MFU, the matmul peak and the losses are medians,
    peak memory is the max; dtype, settings, weights and token counts come from the first finished round (they
    do not change between rounds). Every round's own record is kept under ``repeats``, failed ones included.
    """
    ok = [r for r in records if "summary" in r]
    combined = {"setup": records[0]["setup"], "method": records[0]["method"], "rounds": len(records),
                "failed_rounds": [r["round"] for r in records if "summary" not in r]}
    if not ok:
        return {**combined, "error": records[0].get("error", "?"), "repeats": records}
    first, summaries = ok[0], [r["summary"] for r in ok]
    combined.update({k: v for k, v in first.items() if k not in ("round", "step_records", "wall_seconds")})
    combined.update(
        matmul_peak_flops=statistics.median(r["matmul_peak_flops"] for r in ok),
        eval_loss=statistics.median(r["eval_loss"] for r in ok),
        eval_loss_range=[min(r["eval_loss"] for r in ok), max(r["eval_loss"] for r in ok)],
        peak_rss_mb=max(r["peak_rss_mb"] for r in ok),
        peak_cuda_mb=None if first["peak_cuda_mb"] is None else max(r["peak_cuda_mb"] for r in ok),
        summary={**summaries[0], **{k: statistics.median(s[k] for s in summaries) for k in _MEDIAN_SUMMARY_KEYS},
                 "trained_tokens_per_s_rounds": [s["trained_tokens_per_s"] for s in summaries]},
        repeats=records,
    )
    return combined


def combine_repeats(records: list[dict]) -> list[dict]:
    """Per-round records (in run order, each with its ``round``) -> one combined record per (method, setup), in
    the first round's order, each other setup's carrying posttrain's ``posttrain_speedup`` over it."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["setup"]), []).append(record)
    runs = [combine_rounds(group) for group in groups.values()]

    def tok_s_by_round(run: dict) -> dict[int, float]:
        return {r["round"]: r["summary"]["trained_tokens_per_s"] for r in run["repeats"] if "summary" in r}

    ours = {run["method"]: tok_s_by_round(run) for run in runs if run["setup"] == "posttrain"}
    for run in runs:
        if run["setup"] != "posttrain" and run["method"] in ours:
            run["posttrain_speedup"] = speedup_over_rounds(ours[run["method"]], tok_s_by_round(run))
    return runs


def _speedup_cell(run: dict, baseline: dict[str, float]) -> str:
    """posttrain's speed-up over ``run``: the median of per-round ratios with their min-max (--repeat), else the
    ratio of the two single runs."""
    if run["setup"] == "posttrain":
        return ""
    if "posttrain_speedup" in run:
        sp = run["posttrain_speedup"]
        return f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})" if sp else "no round with both"
    if run["method"] not in baseline:  # posttrain did not run for this method
        return ""
    return f"{baseline[run['method']] / run['summary']['trained_tokens_per_s']:.2f}x"


def _eval_loss_cell(run: dict) -> str:
    low, high = run.get("eval_loss_range", (run["eval_loss"], run["eval_loss"]))
    spread = f" ({low:.4f}-{high:.4f})" if f"{low:.4f}" != f"{high:.4f}" else ""
    return f"{run['eval_loss']:.4f}{spread}"


def markdown_table(results: list[dict], device: str) -> str:
    """One row per (method, setup); with --repeat, medians over the rounds (the headers say which)."""
    rounds = max((r.get("rounds", 1) for r in results), default=1)
    median, most = (f" (median of {rounds})", " (max)") if rounds > 1 else ("", "")
    ratio = f" (median of {rounds} per-round ratios, min-max)" if rounds > 1 else ""
    head = ["method", "setup", "dtype", "timed steps", f"trained tok/s{median}", f"posttrain speed-up{ratio}",
            f"peak RSS MB{most}"]
    if device == "cuda":
        head.append(f"peak CUDA MB{most}")
    head += ["frozen weights MB", f"MFU{median}", "tokens seen", f"eval loss{median}", f"last train loss{median}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baseline = {r["method"]: r["summary"]["trained_tokens_per_s"] for r in results
                if r["setup"] == "posttrain" and "summary" in r}
    for r in results:
        if "summary" not in r:
            lines.append(f"| {r['method']} | {r['setup']} | failed: {r.get('error', '?')[:120]} |")
            continue
        s = r["summary"]
        failed = r.get("failed_rounds")
        finished = f" ({r['rounds'] - len(failed)} of {r['rounds']} rounds finished)" if failed else ""
        cells = [r["method"], r["setup"] + finished, r["compute_dtype"], str(s["steps_timed"]),
                 f"{s['trained_tokens_per_s']:.1f}", _speedup_cell(r, baseline), f"{r['peak_rss_mb']:.0f}"]
        if device == "cuda":
            cells.append(f"{r['peak_cuda_mb']:.0f}")
        cells += [f"{r['frozen_weight_mb']:.0f}", f"{100 * s['mfu']:.1f}%", f"{s['tokens_seen']:,}",
                  _eval_loss_cell(r), f"{s['last_train_loss']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_rounds(results: list[dict]) -> str:
    """With --repeat: each round's run order, trained tokens/s per setup and posttrain's ratio in that round."""
    lines = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        setups = [r["setup"] for r in runs]
        others = [r for r in runs if r.get("posttrain_speedup")]
        tok_s = {(r["setup"], rep["round"]): rep["summary"]["trained_tokens_per_s"]
                 for r in runs for rep in r["repeats"] if "summary" in rep}
        ratios = {(r["setup"], p["round"]): p["ratio"] for r in others for p in r["posttrain_speedup"]["per_round"]}
        head = ["method", "round", "run order", *(f"{s} tok/s" for s in setups),
                *(f"posttrain / {r['setup']}" for r in others)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in range(1, max(r["rounds"] for r in runs) + 1):
            cells = [method, str(k), ", ".join(round_order(setups, k))]
            cells += [f"{tok_s[s, k]:.1f}" if (s, k) in tok_s else "failed" for s in setups]
            cells += [f"{ratios[r['setup'], k]:.2f}x" if (r["setup"], k) in ratios else "" for r in others]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _speedup_target(ours: dict, best: dict) -> dict:
    """LoRA's speed target; with --repeat, judged on the median of the per-round ratios (not a ratio of medians)."""
    target = "LoRA: >= 4x TRL's best trained tokens/s"
    if "posttrain_speedup" not in best:
        speedup = ours["summary"]["trained_tokens_per_s"] / best["summary"]["trained_tokens_per_s"]
        return {"target": target, "value": f"{speedup:.2f}x", "met": speedup >= 4}
    sp = best["posttrain_speedup"]
    if sp is None:
        return {"target": target, "value": "no round in which both finished", "met": False}
    return {"target": target, "value": f"{sp['median']:.2f}x, the median of {sp['rounds']} interleaved rounds' "
                                       f"ratios (min {sp['min']:.2f}x, max {sp['max']:.2f}x)",
            "met": sp["median"] >= 4}


def check_targets(results: list[dict], peaks: dict[str, float]) -> list[dict]:
    """The issue's targets, each with the numbers it was judged on (only those this run's results allow).

    With --repeat the results are :func:`combine_repeats`' records: speed, MFU and loss are judged on medians over
    the rounds, memory on the max, and each value says so.
    """
    done = {(r["method"], r["setup"]): r for r in results if "summary" in r}
    memory = "peak_cuda_mb" if any(r.get("peak_cuda_mb") for r in done.values()) else "peak_rss_mb"
    targets = []
    ours, best = done.get(("lora", "posttrain")), done.get(("lora", "trl-best"))
    if ours and best:
        rounds = ours.get("rounds", 1)
        medians, maxima = (f"; medians of {rounds} rounds", f" (max over {rounds} rounds)") if rounds > 1 else ("", "")
        loss_gap = ours["eval_loss"] / best["eval_loss"] - 1
        targets += [
            _speedup_target(ours, best),
            {"target": "LoRA: eval loss within 2% of TRL's best after the same tokens",
             "value": f"{100 * loss_gap:+.2f}% ({ours['eval_loss']:.4f} vs {best['eval_loss']:.4f}; "
                      f"{ours['summary']['tokens_seen']:,} vs {best['summary']['tokens_seen']:,} tokens{medians})",
             "met": abs(loss_gap) <= 0.02},
            {"target": f"LoRA: no more peak memory than TRL's best ({memory})",
             "value": f"{ours[memory]:.0f} vs {best[memory]:.0f} MB{maxima}", "met": ours[memory] <= best[memory]},
        ]
    for method in METHODS:
        run = done.get((method, "posttrain"))
        if run:
            # Judged against the peak of the dtype the run computes in, timed in its own process (on a CPU
            # without native bf16 that is fp32, the faster one); the bf16 share is given for reference. With
            # --repeat: the median achieved FLOP/s and the median of the per-round MFUs (each against its own peak).
            achieved, mfu = run["summary"]["achieved_tflops"] * 1e12, run["summary"]["mfu"]
            rounds, peak = run.get("rounds", 1), f"{run['matmul_peak_flops'] / 1e9:,.1f}"
            prefix = f"median of {rounds} rounds: " if rounds > 1 else ""
            measured = f"measured in each run (median {peak})" if rounds > 1 else f"measured in the run ({peak})"
            targets.append({
                "target": f"{method}: >= 50% of the measured matmul peak (bf16 where the run computes in bf16)",
                "value": f"{prefix}{achieved / 1e9:,.1f} GFLOP/s = {100 * mfu:.0f}% of the {run['compute_dtype']} "
                         f"peak {measured}; "
                         f"{100 * achieved / peaks['bf16']:.0f}% of the bf16 peak ({peaks['bf16'] / 1e9:,.1f})",
                "met": mfu >= 0.5})
    lora, qlora = done.get(("lora", "posttrain")), done.get(("qlora", "posttrain"))
    if lora and qlora:
        bf16_base = 2 * lora["weights"]["frozen_params"]  # the LoRA base stored in bf16
        q = qlora["weights"]
        targets.append({
            "target": "QLoRA base weights ~ 1/4 of bf16 LoRA's",
            "value": f"{q['frozen_bytes'] / 2**20:.0f} MB vs {bf16_base / 2**20:.0f} MB = "
                     f"{q['frozen_bytes'] / bf16_base:.2f} overall; the 4-bit linear layers alone "
                     f"{q['quantized_bytes'] / 2**20:.0f} MB vs {2 * q['quantized_params'] / 2**20:.0f} MB in bf16 = "
                     f"{q['quantized_bytes'] / (2 * q['quantized_params']):.2f}",
            "met": q["frozen_bytes"] / bf16_base <= 0.3})
    return targets


def repeat_note(repeat: int) -> str:
    """What the numbers of a --repeat run are, for the top of results.md."""
    return (f"**Medians of {repeat} interleaved rounds.** Each method's setups ran {repeat} times, one run of "
            "each per round, in the order listed on odd rounds and reversed on even ones (so that no setup always "
            "goes first and slow drift in the machine's speed spreads over all of them). Trained tok/s, MFU and "
            "losses are medians over the rounds; posttrain's speed-up is the median of the per-round ratios "
            "(posttrain / that setup in the same round), with the min-max of those ratios; peak memory is the "
            "max over the rounds. Each round's numbers are under Rounds below, and every run's full record in "
            "results.json (`runs[].repeats`).")


def markdown_report(report: dict, peak_size: int) -> str:
    peaks, stats = report["matmul_peak_flops"], report["data"]
    lines = [
        f"# SFT throughput, {report['device']}", "", f"`{report['command']}`", "",
        f"Data: {stats['rows']} chat rows, median {stats['median_tokens']:.0f} tokens, longest "
        f"{stats['max_tokens_before_truncation']} ({stats['truncated_rows']} truncated to "
        f"{report['config']['max_length']}); {stats['trained_tokens'] / stats['processed_tokens']:.1%} of tokens are "
        "trained (assistant turns). Tokens/s count trained tokens.",
        f"Matmul peak ({peak_size}x{peak_size}, F.linear): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s. MFU is against the peak of the run's dtype, re-measured in "
        "the run's own process.", "",
    ]
    repeat = report["config"].get("repeat", 1)
    if repeat > 1:
        lines += [repeat_note(repeat), ""]
    lines.append(markdown_table(report["runs"], report["device"]))
    for check in report["token_set_check"]:
        lines.append(f"Same trained tokens ({check['method']}): TRL's prepared data has "
                     f"{check['trl_prepared_trained_tokens']:,}, posttrain's {check['posttrain_trained_tokens']:,}: "
                     f"{'identical' if check['same'] else 'DIFFERENT'}.\n")
    if repeat > 1:
        lines += ["## Rounds", "", markdown_rounds(report["runs"])]
    lines += [
        "## Targets", "",
        "| target | measured | met |", "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


# ============================================================================================== driver
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "flash-attn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, str]:
    info = {"platform": platform.platform(), "cpu_count": str(os.cpu_count())}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Core(s) per socket", "Socket(s)", "Thread(s) per core"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="timed optimizer steps of the packed runs (default 1 on CPU, 20 on CUDA); unpacked runs "
                        "take as many steps as needed for the same trained-token budget")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps at the start of every run")
    p.add_argument("--batch-size", type=int, default=8, help="sequences (packed rows when packing) per step")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence; longer rows are truncated")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default: lora on CPU, all on CUDA)")
    p.add_argument("--tools", default=None,
                   help="comma-separated: posttrain, trl (= trl-default,trl-best), trl-default, trl-best "
                        "(default: posttrain,trl-best on CPU, posttrain,trl on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--trl-bf16", default="auto", choices=["auto", "on", "off"],
                   help="TRL's bf16: auto = on where bf16 is native (CUDA with bf16, or a CPU whose measured bf16 "
                        "matmul is at least as fast as fp32); TRL's own default is on everywhere")
    p.add_argument("--model", default="smollm2-135m", help="posttrain model spec (resolved to a local directory)")
    p.add_argument("--rows", type=int, default=600, help="generated training rows")
    p.add_argument("--eval-rows", type=int, default=None,
                   help="held-out rows for the eval loss (default 8 on CPU, 64 on CUDA)")
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size of the peak measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="profile the first timed step of the posttrain runs with torch.profiler (written to "
                        "runs/<name>/profile.txt); profiling slows them, so do not compare their timings")
    p.add_argument("--quick", action="store_true", help="1 timed step per run and 2 eval rows")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds per method: every setup runs once per round, in the --tools order on odd rounds "
                        "and reversed on even ones; tokens/s, MFU and losses are reported as medians over the "
                        "rounds, posttrain's speed-up as the median (min-max) of the per-round ratios, peak "
                        "memory as the max; results.json keeps every round (default 1: one run each)")
    p.add_argument("--run-timeout", type=int, default=3600, help="seconds before a run is stopped")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>-<date>)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def expand_tools(tools: str) -> list[str]:
    setups: list[str] = []
    for tool in tools.split(","):
        tool = tool.strip()
        names = ["trl-default", "trl-best"] if tool == "trl" else [tool]
        for name in names:
            if name not in SETUPS:
                raise SystemExit(f"--tools: unknown tool {tool!r}; use posttrain, trl, trl-default or trl-best")
            if name not in setups:
                setups.append(name)
    return setups


@dataclass
class Prepared:
    """The data every run shares, written once to the scratch folder."""

    train_file: Path
    eval_file: Path
    eval_rows: int
    stats: DataStats
    shape: ModelShape


def prepare_data(args: argparse.Namespace, model_dir: str, eval_rows: int, scratch: Path) -> Prepared:
    conversations = make_conversations(args.rows + eval_rows, args.seed)
    train_file, eval_raw = scratch / "train.jsonl", scratch / "eval-rows.jsonl"
    write_jsonl(conversations[:args.rows], train_file)
    write_jsonl(conversations[args.rows:], eval_raw)
    examples, truncated, longest = tokenize_like_posttrain(train_file, model_dir, args.max_length)
    stats = data_stats(examples, truncated, longest, args.max_length)
    eval_examples, _, _ = tokenize_like_posttrain(eval_raw, model_dir, args.max_length)
    eval_file = scratch / "eval-tokens.jsonl"
    write_jsonl([{"input_ids": e.input_ids, "loss_mask": e.loss_mask} for e in eval_examples], eval_file)
    shape = ModelShape.from_config(json.loads((Path(model_dir) / "config.json").read_text()), LORA["r"])
    return Prepared(train_file, eval_file, len(eval_examples), stats, shape)


def run_one(spec: RunSpec, results_dir: Path, timeout: int, flops_per_token: float,
            label: str | None = None) -> dict:
    """One run in its own subprocess; its log, spec and result land in ``results_dir``. ``label`` names it in the
    progress lines (default ``<method>-<setup>``)."""
    name = label or f"{spec.method}-{spec.setup}"
    results_dir.mkdir(parents=True, exist_ok=True)
    spec_path = results_dir / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=2))
    print(f"[{name}] {spec.steps} steps ...", flush=True)
    started = time.perf_counter()
    with open(results_dir / "log.txt", "w") as log:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            error = None if proc.returncode == 0 else f"exit {proc.returncode}, see {results_dir / 'log.txt'}"
        except subprocess.TimeoutExpired:
            error = f"stopped after {timeout} s"
    if error is not None:
        print(f"[{name}] FAILED: {error}", flush=True)
        return {"setup": spec.setup, "method": spec.method, "error": error}
    record = json.loads((results_dir / "result.json").read_text())
    record["summary"] = s = summarize(record, spec.warmup, flops_per_token)
    print(f"[{name}] {s['trained_tokens_per_s']:.1f} trained tok/s, MFU {100 * s['mfu']:.1f}%, peak RSS "
          f"{record['peak_rss_mb']:.0f} MB, eval loss {record['eval_loss']:.4f} ({time.perf_counter() - started:.0f} s)",
          flush=True)
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        child_main(Path(args.child))
        return []
    import torch

    from posttrain.models.loading import resolve_model

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device == "cpu"
    steps = args.steps or (1 if args.quick or cpu else 20)
    eval_rows = args.eval_rows or (2 if args.quick else 8 if cpu else 64)
    methods = [m.strip() for m in (args.methods or ("lora" if cpu else ",".join(METHODS))).split(",")]
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.repeat < 1:
        raise SystemExit("--repeat: at least 1")
    setups = expand_tools(args.tools or ("posttrain,trl-best" if cpu else "posttrain,trl"))
    if any(s.startswith("trl") for s in setups) and importlib.util.find_spec("trl") is None:
        print("TRL is not installed (pip install -e '.[bench]'): running posttrain only", flush=True)
        setups = [s for s in setups if s == "posttrain"]
    out = Path(args.out or Path(__file__).parent / "results" / f"{device}-{datetime.date.today()}")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sft-bench-"))  # data and the runs' saved models, deleted at the end
    try:
        model_dir = resolve_model(args.model)
        data = prepare_data(args, model_dir, eval_rows, scratch)
        stats = data.stats
        peaks = {d: matmul_peak(d, device, args.peak_size) for d in ("fp32", "bf16")}
        if args.trl_bf16 == "auto":
            trl_bf16 = peaks["bf16"] >= peaks["fp32"] if cpu else torch.cuda.is_bf16_supported()
        else:
            trl_bf16 = args.trl_bf16 == "on"
        # The same trained-token budget for every run: packed runs take warmup + steps; an unpacked run as many
        # steps as it needs for the packed runs' expected trained tokens.
        total_packed = args.warmup + steps
        total_unpacked = math.ceil(total_packed * stats.rows / stats.packed_rows)
        print(f"data: {stats.rows} rows, median {stats.median_tokens:.0f} tokens, p90 {stats.p90_tokens}, longest "
              f"{stats.max_tokens_before_truncation} before truncation ({stats.truncated_rows} truncated to "
              f"{args.max_length}), {stats.trained_tokens / stats.processed_tokens:.1%} of tokens trained", flush=True)
        print(f"matmul peak ({args.peak_size}^2, {device}): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
              f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; TRL bf16 {'on' if trl_bf16 else 'off'}", flush=True)
        records = []
        for method, round_no, setup in run_order(methods, setups, args.repeat):
            name = f"{method}-{setup}"
            # with --repeat, each round in its own folder: runs/<method>-<setup>/round-<k>
            where = Path(name) if args.repeat == 1 else Path(name) / f"round-{round_no}"
            spec = RunSpec(
                setup=setup, method=method, model_dir=model_dir, device=device,
                train_file=str(data.train_file), eval_file=str(data.eval_file),
                workdir=str(out / "runs" / where), scratch=str(scratch / "-".join(where.parts)),
                steps=total_unpacked if setup == "trl-default" else total_packed, warmup=args.warmup,
                batch_size=args.batch_size, max_length=args.max_length, bf16=trl_bf16, seed=args.seed,
                peak_size=args.peak_size, profile=args.profile)
            label = None if args.repeat == 1 else f"{name} round {round_no}/{args.repeat}"
            record = run_one(spec, Path(spec.workdir), args.run_timeout,
                             flops_per_trained_token(data.shape, stats, method), label=label)
            shutil.rmtree(spec.scratch, ignore_errors=True)  # the run's saved model: unused, and rounds add up
            if args.repeat > 1:
                record["round"] = round_no
            records.append(record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = records if args.repeat == 1 else combine_repeats(records)

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": datetime.datetime.now().isoformat(),
        "device": device, "machine": machine(), "versions": library_versions(),
        "config": {"batch_size": args.batch_size, "max_length": args.max_length, "lora": LORA, "lr": LEARNING_RATE,
                   "warmup_steps": args.warmup, "timed_steps_packed": steps, "steps_unpacked": total_unpacked,
                   "eval_rows": data.eval_rows, "trl_bf16": trl_bf16, "tokens": "trained (assistant) tokens",
                   **({"repeat": args.repeat, "run_order": run_order(methods, setups, args.repeat)}
                      if args.repeat > 1 else {})},
        "data": asdict(stats), "model_shape": asdict(data.shape), "matmul_peak_flops": peaks, "runs": results,
    }
    report["targets"] = check_targets(results, peaks)
    report["token_set_check"] = [
        {"method": r["method"], "trl_prepared_trained_tokens": r["prepared_trained_tokens"],
         "posttrain_trained_tokens": stats.trained_tokens, "same": r["prepared_trained_tokens"] == stats.trained_tokens}
        for r in results if r["setup"] == "trl-default" and "summary" in r]
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_report(report, args.peak_size))
    print("\n" + markdown_table(results, device) + f"\nresults in {out}", flush=True)
    return results


if __name__ == "__main__":
    main()
