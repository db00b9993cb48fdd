"""GRPO throughput: posttrain against TRL's ``GRPOTrainer``, and posttrain's rollout engine against ``generate``.

    python benchmarks/grpo_throughput.py --steps 4 --prompts-per-step 8 --num-generations 8 --max-new-tokens 64
    python benchmarks/grpo_throughput.py --parts rollout               # only the rollout engine vs generate
    python benchmarks/grpo_throughput.py --contenders posttrain --parts grpo --out /tmp/grpo.json
    .venv-vllm/bin/python benchmarks/grpo_throughput.py --parts grpo --contenders posttrain,posttrain-vllm,trl,trl-vllm

Run it ALONE on the machine: the numbers are wall times, and a second job sharing the cores (or the GPU) changes
them by more than the differences measured. The ratios are the headline; absolute times are noisy.

Two parts (``--parts``):

- ``grpo``: GRPO training steps, one run per contender, each in its own subprocess (so one's memory and caches
  do not affect the other). Both train the same model with the same LoRA (r 16 on all linear layers, alpha 32,
  dropout 0), fp32, the same prompts per optimizer step, group size, completion budget, temperature, learning
  rate (constant, no warmup, no weight decay, clipping at 1.0), beta (KL to the base model, which both get by
  disabling the adapter), clipping epsilon 0.2, one update per rollout, token-level loss normalisation and
  group-std reward scaling, on the built-in arithmetic task (:func:`posttrain.demo.arith_task.make_rows`) with
  the same deterministic reward, :func:`arith_reward`. posttrain runs through its public API
  (``posttrain.stages.grpo.train``) at its other defaults (packed micro-batches; user reward code in its worker
  subprocess); TRL is ``GRPOTrainer`` with ``use_vllm=False`` (``model.generate``), ``bf16=False``, gradient
  checkpointing off and ``loss_type="dapo"``, ``scale_rewards="group"``. Prompts per step match exactly:
  posttrain's ``batch_size`` (prompts per micro-batch) x ``num_generations`` = TRL's
  ``per_device_train_batch_size`` (completions), and both accumulate ``prompts-per-step / micro-batch-prompts``
  micro-batches per optimizer step, generating every completion of the step in one rollout.
- ``rollout``: no training. On one model (the base model under a fresh LoRA adapter, as both trainers generate),
  the same prompts, ``n`` samples each, the same ``max_new_tokens`` and temperature: posttrain's
  :class:`~posttrain.rl.rollout.RolloutSampler` against ``model.generate(num_return_sequences=n, do_sample=True)``
  (a) one prompt at a time in a loop and (b) over all prompts at once, left-padded (what TRL does).

Measured per optimizer step after the first ``--warmup`` steps: wall seconds (rollout, rewards, reference pass,
forward/backward and the optimizer step; posttrain's ``train/step_seconds``, TRL's ``on_step_begin`` to
``on_step_end``), rollout seconds and completion tokens (posttrain's ``train/rollout/seconds`` and
``train/length/mean``; TRL's ``_generate_single_turn`` timed and its completion ids counted), and completion
tokens trained (posttrain's ``train/units``, TRL's ``completion_mask``). Completion tokens count up to and
including the EOS, never padding. Completion lengths differ between the runs (sampling is random), so compare
tokens/s, not seconds per step. Peak RSS is each subprocess's own ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONTENDERS = ("posttrain", "posttrain-vllm", "trl", "trl-vllm")
# vLLM contenders (opt-in: --contenders posttrain,posttrain-vllm,trl,trl-vllm) need vLLM installed (`make vllm`,
# then run this script with .venv-vllm/bin/python so every contender uses the same libraries): posttrain with
# rollout.engine=vllm (colocated, LoRA synced every step), TRL with use_vllm=True, vllm_mode="colocate".
PARTS = ("grpo", "rollout")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
ROLLOUT_METHODS = ("posttrain-engine", "generate-loop", "generate-batched")


# ============================================================================================== task and reward
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def arith_reward(prompt, completion: str, answer, **row) -> float:
    """1.0 if the last number in the completion equals ``answer``, else 0.0: pure Python, deterministic.

    posttrain calls it per row (``function: <this file>:arith_reward``, in its reward worker subprocess); TRL
    through :func:`trl_arith_reward`, in-process."""
    numbers = _NUMBER.findall(completion.replace(",", ""))
    return float(bool(numbers) and float(numbers[-1]) == float(answer))


def trl_arith_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """:func:`arith_reward` as a TRL reward function; conversational completions are ``[{role, content}]``."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [arith_reward(p, t, a) for p, t, a in zip(prompts, texts, answer, strict=True)]


def make_prompts(n: int, seed: int) -> list[dict]:
    from posttrain.demo.arith_task import make_rows

    return make_rows(n, "train", seed)


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# ============================================================================================== runs
@dataclass
class RunSpec:
    part: str  # grpo or rollout
    contender: str  # posttrain or trl (grpo); "rollout" for the rollout part (its methods run in one process)
    model_dir: str
    device: str
    prompts_file: str
    workdir: str  # spec, log and result
    scratch: str  # the trainer's output_dir; deleted after the benchmark
    steps: int  # optimizer steps in total, warmup included
    warmup: int
    prompts_per_step: int
    micro_batch_prompts: int
    num_generations: int
    max_new_tokens: int
    temperature: float
    lr: float
    beta: float
    seed: int
    threads: int | None
    max_prompt_length: int
    posttrain_overrides: list[str] = field(default_factory=list)  # --posttrain-set: one lever on or off, for A/B runs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_posttrain(spec: RunSpec, engine: str = "builtin") -> dict:
    from posttrain.commands import load_config
    from posttrain.config import to_dict
    from posttrain.stages import grpo

    per_step = spec.prompts_per_step * spec.num_generations
    reward = f"{Path(__file__).resolve()}:arith_reward"
    overrides = [
        f"model={spec.model_dir}", "method=lora", f"data.train={spec.prompts_file}", f"output_dir={spec.scratch}",
        f"max_steps={spec.steps}", f"batch_size={spec.micro_batch_prompts}",
        f"grad_accum={spec.prompts_per_step // spec.micro_batch_prompts}", f"num_generations={spec.num_generations}",
        f"rollout_batch_size={spec.prompts_per_step}", f"max_prompt_length={spec.max_prompt_length}",
        f"sampling.max_new_tokens={spec.max_new_tokens}", f"sampling.temperature={spec.temperature}",
        "sampling.top_p=1.0", "sampling.top_k=0", f"lr={spec.lr}", "lr_scheduler=constant", "warmup_ratio=0",
        "weight_decay=0", "max_grad_norm=1.0", f"seed={spec.seed}", f"beta={spec.beta}", "advantage=grpo",
        "scale_rewards=true", "loss_norm=token", "num_iterations=1", "clip_low=0.2", "clip_high=0.2",
        "precision=fp32", "gradient_checkpointing=false", "log_every=1", "tensorboard=false",
        f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}",
        "lora.target_modules=all-linear", f"rewards=[{{function: '{reward}'}}]", f"rollout.engine={engine}",
        *spec.posttrain_overrides,
    ]
    if engine == "vllm":
        overrides.append("rollout.vllm.memory=0.1")
    cfg = load_config("grpo", None, overrides)
    result = grpo.train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "train/step_seconds" in r]
    steps = [{
        "step": r["step"], "seconds": r["train/step_seconds"], "rollout_seconds": r["train/rollout/seconds"],
        "rollout_tokens": round(r["train/length/mean"] * per_step), "trained_tokens": int(r["train/units"]),
        "mean_completion_length": r["train/length/mean"], "reward": r["train/reward"], "loss": r["train/loss"],
        "engine_rollout_tokens_per_s": r["train/rollout/tokens_per_s"],
        "sync_seconds": r.get("train/rollout/sync_seconds", 0.0), "logp_gap": r.get("train/rollout/logp_gap"),
    } for r in rows]
    return {"settings": {"overrides": overrides, "config": to_dict(cfg)}, "steps": steps,
            "trainable_params": _trainable_params(result.model)}


def run_trl(spec: RunSpec, use_vllm: bool = False) -> dict:
    import dataclasses

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data.prompts import prompt_token_ids

    rows = read_jsonl(Path(spec.prompts_file))
    device = spec.device
    # transformers 5 renamed gradient_checkpointing (TRL turns it on by default) to activation_checkpointing
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    no_ckpt = {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}
    args = GRPOConfig(
        output_dir=spec.scratch, max_steps=spec.steps,
        per_device_train_batch_size=spec.micro_batch_prompts * spec.num_generations,
        gradient_accumulation_steps=spec.prompts_per_step // spec.micro_batch_prompts,
        num_generations=spec.num_generations, max_completion_length=spec.max_new_tokens,
        temperature=spec.temperature, top_p=1.0, top_k=0, learning_rate=spec.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=spec.beta, epsilon=0.2, num_iterations=1,
        loss_type="dapo", scale_rewards="group", mask_truncated_completions=False, use_vllm=use_vllm, bf16=False,
        seed=spec.seed, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=device == "cpu", log_completions=False,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"}, **no_ckpt,
        **({"vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.1} if use_vllm else {}),
    )
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                             lora_dropout=LORA["dropout"], target_modules="all-linear")

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step (on_step_begin to on_step_end) and TRL's own logs."""

        def __init__(self):
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.logs: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    class TimedGRPOTrainer(GRPOTrainer):
        """Times each rollout (``_generate_single_turn``: ``model.generate`` and its EOS masking), counts its
        completion tokens, and counts the completion tokens each training micro-batch trains on."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.rollouts: list[dict] = []
            self.trained: dict[int, int] = {}

        def _generate_single_turn(self, *a, **kw):
            _sync(device)
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*a, **kw)
            _sync(device)
            self.rollouts.append({"seconds": time.perf_counter() - t0, "tokens": sum(len(c) for c in out[0])})
            return out

        def _prepare_inputs(self, generation_batch):
            inputs = super()._prepare_inputs(generation_batch)
            if self.model.training:
                step = self.state.global_step
                self.trained[step] = self.trained.get(step, 0) + int(inputs["completion_mask"].sum())
            return inputs

    clock = StepClock()
    trainer = TimedGRPOTrainer(model=spec.model_dir, reward_funcs=[trl_arith_reward], args=args,
                               train_dataset=Dataset.from_list(rows), peft_config=peft_config, callbacks=[clock])
    # TRL tokenizes prompts itself (no max_prompt_length in TRL 1.x: nothing is cut); check it sees posttrain's ids.
    theirs = trainer._tokenize_prompts([r["prompt"] for r in rows])[0]
    same_prompts = [list(t) for t in theirs] == [prompt_token_ids(trainer._tokenizer, r["prompt"]) for r in rows]
    trainer.train()
    if len(trainer.rollouts) != spec.steps or len(clock.ends) != spec.steps:
        raise RuntimeError(f"expected one rollout per optimizer step: {len(trainer.rollouts)} rollouts, "
                           f"{len(clock.ends)} steps of {spec.steps}")
    lengths = [log["completions/mean_length"] for log in clock.logs]
    steps = [{
        "step": i + 1, "seconds": end - begin, "rollout_seconds": r["seconds"], "rollout_tokens": r["tokens"],
        "trained_tokens": trainer.trained.get(i, 0),
        "mean_completion_length": lengths[i] if i < len(lengths) else None,
        "reward": clock.logs[i].get("reward") if i < len(clock.logs) else None,
        "loss": clock.logs[i].get("loss") if i < len(clock.logs) else None,
    } for i, (begin, end, r) in enumerate(zip(clock.begins, clock.ends, trainer.rollouts))]
    return {
        "settings": {"per_device_train_batch_size": args.per_device_train_batch_size,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps,
                     "steps_per_generation": args.steps_per_generation,
                     "generation_batch_size": args.generation_batch_size, "loss_type": args.loss_type,
                     "scale_rewards": args.scale_rewards, "beta": args.beta, "bf16": args.bf16,
                     "gradient_checkpointing": args.gradient_checkpointing, "use_vllm": args.use_vllm,
                     "attn_implementation": "sdpa"},
        "same_prompt_tokens_as_posttrain": same_prompts,
        "steps": steps, "trainable_params": _trainable_params(trainer.model),
    }


# ---------------------------------------------------------------------------------------------- rollout part
def _generated_tokens(completion_ids, eos_ids: set[int]) -> int:
    """Tokens of each row up to and including its first EOS (the rest is padding): summed over rows."""
    total = 0
    for row in completion_ids.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in eos_ids:
                n = i + 1
                break
        total += n
    return total


def run_rollout(spec: RunSpec) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    from posttrain.data.prompts import prompt_token_ids
    from posttrain.models.loading import load_tokenizer
    from posttrain.rl.rollout import RolloutSampler, Sampling
    from posttrain.rl.run import eos_token_ids

    device = spec.device
    tokenizer = load_tokenizer(spec.model_dir)
    base = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                            lora_dropout=LORA["dropout"], target_modules="all-linear"))
    model.to(device).eval()
    rows = read_jsonl(Path(spec.prompts_file))[: spec.prompts_per_step]
    prompts = [prompt_token_ids(tokenizer, r["prompt"]) for r in rows]
    eos = eos_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id
    n, temperature = spec.num_generations, spec.temperature

    def gen_config(max_new_tokens: int, samples: int) -> GenerationConfig:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
            else {"do_sample": False}
        return GenerationConfig(max_new_tokens=max_new_tokens, num_return_sequences=samples, pad_token_id=pad,
                                eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, disable_compile=True,
                                **sampling)

    def engine(ps: list[list[int]], samples: int, max_new_tokens: int) -> int:
        generator = torch.Generator(device=device).manual_seed(spec.seed)
        out = RolloutSampler(tokenizer, prompts_per_batch=len(ps), eos_token_ids=eos).generate(
            model, ps, samples, Sampling(max_new_tokens=max_new_tokens, temperature=temperature), generator)
        return sum(len(c.token_ids) for c in out)

    def loop(ps: list[list[int]], samples: int, max_new_tokens: int) -> int:
        config, total = gen_config(max_new_tokens, samples), 0
        for p in ps:
            ids = torch.tensor([p], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            total += _generated_tokens(out[:, ids.shape[1]:], set(eos))
        return total

    def batched(ps: list[list[int]], samples: int, max_new_tokens: int) -> int:
        width = max(len(p) for p in ps)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config(max_new_tokens, samples))
        return _generated_tokens(out[:, width:], set(eos))

    results = {}
    with torch.no_grad():
        for name, fn in zip(ROLLOUT_METHODS, (engine, loop, batched), strict=True):
            torch.manual_seed(spec.seed)
            fn(prompts[:1], min(n, 2), min(spec.max_new_tokens, 4))  # warm-up: first-call costs are not timed
            torch.manual_seed(spec.seed)
            _sync(device)
            t0 = time.perf_counter()
            tokens = fn(prompts, n, spec.max_new_tokens)
            _sync(device)
            seconds = time.perf_counter() - t0
            results[name] = {"completions": len(prompts) * n, "completion_tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds}
            print(f"[rollout] {name}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s", flush=True)
    return {"methods": results, "prompt_tokens": [len(p) for p in prompts], "eos_token_ids": eos,
            "lora_applied": True, "trainable_params": _trainable_params(model)}


def child_main(spec_path: Path) -> None:
    """Run one spec in this process and write its result next to the spec."""
    import torch

    spec = RunSpec(**json.loads(spec_path.read_text()))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if spec.part == "rollout":
        out = run_rollout(spec)
    else:
        out = {"posttrain": lambda: run_posttrain(spec), "posttrain-vllm": lambda: run_posttrain(spec, "vllm"),
               "trl": lambda: run_trl(spec), "trl-vllm": lambda: run_trl(spec, use_vllm=True)}[spec.contender]()
    out.update(part=spec.part, contender=spec.contender, device=spec.device, threads=torch.get_num_threads(),
               peak_rss_mb=peak_rss_mb(),
               peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if spec.device == "cuda" else None,
               wall_seconds=time.perf_counter() - started)
    (spec_path.parent / "result.json").write_text(json.dumps(out, indent=2))


def run_one(spec: RunSpec, timeout: int) -> dict:
    """One run in its own subprocess; its spec, log and result land in ``spec.workdir``."""
    name = spec.contender if spec.part == "grpo" else "rollout"
    workdir = Path(spec.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=2))
    print(f"[{name}] ...", flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if spec.threads:
        env.update(OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
    started = time.perf_counter()
    with open(workdir / "log.txt", "w") as log:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, env=env)
            error = None if proc.returncode == 0 else f"exit {proc.returncode}, see {workdir / 'log.txt'}"
        except subprocess.TimeoutExpired:
            error = f"stopped after {timeout} s"
    if error is not None:
        print(f"[{name}] FAILED: {error}", flush=True)
        return {"part": spec.part, "contender": spec.contender, "error": error}
    record = json.loads((workdir / "result.json").read_text())
    if spec.part == "grpo":
        record["summary"] = s = summarize(record["steps"], spec.warmup, spec.prompts_per_step * spec.num_generations)
        print(f"[{name}] {s['step_seconds']:.2f} s/step, rollout {s['rollout_tokens_per_s']:.1f} tok/s, "
              f"{s['trained_tokens_per_s']:.1f} trained tok/s, peak RSS {record['peak_rss_mb']:.0f} MB "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return record


# ============================================================================================== summary
def summarize(steps: list[dict], warmup: int, completions_per_step: int) -> dict:
    """Steady-state numbers over the steps after warmup (all steps if there are no others)."""
    timed = steps[warmup:] or steps
    seconds = sum(s["seconds"] for s in timed)
    rollout_seconds = sum(s["rollout_seconds"] for s in timed)
    rollout_tokens = sum(s["rollout_tokens"] for s in timed)
    trained = sum(s["trained_tokens"] for s in timed)
    return {
        "steps_total": len(steps), "steps_timed": len(timed),
        "step_seconds": seconds / len(timed),
        "step_seconds_median": statistics.median(s["seconds"] for s in timed),
        "rollout_seconds_per_step": rollout_seconds / len(timed),
        "rollout_share": rollout_seconds / seconds,
        "rollout_tokens_per_s": rollout_tokens / rollout_seconds,
        "trained_tokens_per_s": trained / seconds,
        "trained_tokens_per_step": trained / len(timed),
        "mean_completion_length": rollout_tokens / (completions_per_step * len(timed)),
    }


RATIO_KEYS = ("trained_tokens_per_s", "rollout_tokens_per_s", "step_seconds", "rollout_seconds_per_step")
PAIRS = (("posttrain", "trl"), ("posttrain-vllm", "posttrain"), ("posttrain-vllm", "trl-vllm"), ("posttrain-vllm", "trl"),
         ("trl-vllm", "trl"))


def ratios(runs: list[dict]) -> dict | None:
    """posttrain / TRL (the historical key) and, with the vLLM contenders, every pair of PAIRS that ran."""
    done = {r["contender"]: r["summary"] for r in runs if "summary" in r}
    if not {"posttrain", "trl"} <= set(done):
        return None
    ours, theirs = done["posttrain"], done["trl"]
    return {key: ours[key] / theirs[key] for key in RATIO_KEYS}


def pair_ratios(runs: list[dict]) -> dict[str, dict]:
    done = {r["contender"]: r["summary"] for r in runs if "summary" in r}
    return {f"{a} / {b}": {key: done[a][key] / done[b][key] for key in RATIO_KEYS}
            for a, b in PAIRS if a in done and b in done}


def grpo_table(runs: list[dict], rel: dict | None) -> str:
    head = ["contender", "timed steps", "s/step", "rollout s/step", "rollout tok/s", "trained tok/s",
            "completion len", "peak RSS MB", "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        if "summary" not in r:
            lines.append(f"| {r['contender']} | failed: {r.get('error', '?')[:120]} |")
            continue
        s = r["summary"]
        lines.append("| " + " | ".join([
            r["contender"], str(s["steps_timed"]), f"{s['step_seconds']:.2f}", f"{s['rollout_seconds_per_step']:.2f}",
            f"{s['rollout_tokens_per_s']:.1f}", f"{s['trained_tokens_per_s']:.1f}",
            f"{s['mean_completion_length']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['trainable_params']:,}"]) + " |")
    lines.append("")
    for pair, rel in pair_ratios(runs).items():
        lines.append(f"{pair}: trained tok/s {rel['trained_tokens_per_s']:.2f}x, rollout tok/s "
                     f"{rel['rollout_tokens_per_s']:.2f}x, s/step {rel['step_seconds']:.2f}x (lower is faster)  ")
    syncs = [(r["contender"], statistics.fmean(s.get("sync_seconds", 0.0) for s in r["steps"])) for r in runs
             if "steps" in r and any(s.get("sync_seconds") for s in r["steps"])]
    for name, sec in syncs:
        lines.append(f"{name}: weight sync {sec * 1000:.0f} ms per step (mean), included in s/step  ")
    return "\n".join(lines) + "\n"


def rollout_table(record: dict) -> str:
    if "methods" not in record:
        return f"rollout: failed: {record.get('error', '?')}\n"
    methods = record["methods"]
    ours = methods["posttrain-engine"]["tokens_per_s"]
    lines = ["| method | completions | completion tokens | seconds | tok/s | engine speed-up |", "|---|---|---|---|---|---|"]
    for name, m in methods.items():
        ratio = "" if name == "posttrain-engine" else f"{ours / m['tokens_per_s']:.2f}x"
        lines.append(f"| {name} | {m['completions']} | {m['completion_tokens']} | {m['seconds']:.2f} | "
                     f"{m['tokens_per_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


# ============================================================================================== driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="posttrain model spec (resolved to a local directory)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per contender (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps at the start of every run")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per optimizer step (each sampled "
                   "--num-generations times); also the prompts of the rollout part")
    p.add_argument("--micro-batch-prompts", type=int, default=None,
                   help="prompts per micro-batch (posttrain batch_size; TRL per_device_train_batch_size is this x "
                        "--num-generations); must divide --prompts-per-step (default: min(4, prompts per step))")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt (the GRPO group)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion budget in tokens (EOS included)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (top-p 1, top-k off)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (constant)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (both get the reference by disabling "
                   "the LoRA adapter)")
    p.add_argument("--posttrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra posttrain config override (repeatable), e.g. measure_kl=always: A/B one lever")
    p.add_argument("--contenders", default="posttrain,trl", help="comma-separated subset of posttrain,trl")
    p.add_argument("--parts", default="grpo,rollout", help="comma-separated subset of grpo,rollout")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout", type=int, default=3600, help="seconds before a run is stopped")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/grpo-<device>-<date>.json); "
                   "each run's spec and log go to <out without .json>-runs/")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _subset(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if unknown := sorted(set(items) - set(allowed)):
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {', '.join(allowed)}")
    return [a for a in allowed if a in items]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        child_main(Path(args.child))
        return {}
    import torch

    from posttrain.data.prompts import prompt_token_ids
    from posttrain.models.loading import load_tokenizer, resolve_model

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from sft_throughput import library_versions, machine

    contenders = _subset(args.contenders, CONTENDERS, "--contenders")
    parts = _subset(args.parts, PARTS, "--parts")
    if {"trl", "trl-vllm"} & set(contenders) and "grpo" in parts and importlib.util.find_spec("trl") is None:
        print("TRL is not installed (pip install -e '.[bench]'): running posttrain only", flush=True)
        contenders = [c for c in contenders if not c.startswith("trl")]
    if any(c.endswith("-vllm") for c in contenders) and importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed in this Python (make vllm; run with .venv-vllm/bin/python): skipping the vLLM "
              "contenders", flush=True)
        contenders = [c for c in contenders if not c.endswith("-vllm")]
    micro = args.micro_batch_prompts or min(4, args.prompts_per_step)
    if args.prompts_per_step % micro:
        raise SystemExit(f"--micro-batch-prompts {micro} must divide --prompts-per-step {args.prompts_per_step}")
    if args.num_generations < 2:
        raise SystemExit("--num-generations: GRPO needs at least 2 completions per prompt")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out or Path(__file__).parent / "results" / f"grpo-{device}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs_dir = out.with_name(out.stem + "-runs")
    total_steps = args.warmup + args.steps

    model_dir = resolve_model(args.model)
    rows = make_prompts(args.prompts_per_step * total_steps, args.seed)
    tokenizer = load_tokenizer(model_dir)
    prompt_lengths = [len(prompt_token_ids(tokenizer, r["prompt"])) for r in rows]
    max_prompt_length = max(512, max(prompt_lengths))  # posttrain drops longer prompts: none is dropped
    scratch = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    prompts_file = scratch / "prompts.jsonl"
    write_jsonl(rows, prompts_file)
    print(f"{len(rows)} arithmetic prompts, {min(prompt_lengths)}-{max(prompt_lengths)} tokens; "
          f"{args.prompts_per_step} prompts x {args.num_generations} completions per step, "
          f"{micro} prompts per micro-batch, up to {args.max_new_tokens} new tokens, {device}", flush=True)

    def spec(part: str, contender: str) -> RunSpec:
        name = contender if part == "grpo" else "rollout"
        return RunSpec(
            part=part, contender=contender, model_dir=str(model_dir), device=device, prompts_file=str(prompts_file),
            workdir=str(runs_dir / name), scratch=str(scratch / name), steps=total_steps, warmup=args.warmup,
            prompts_per_step=args.prompts_per_step, micro_batch_prompts=micro,
            num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, lr=args.lr, beta=args.beta, seed=args.seed, threads=args.threads,
            max_prompt_length=max_prompt_length, posttrain_overrides=list(args.posttrain_set))

    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": datetime.datetime.now().isoformat(),
        "device": device, "machine": machine(), "versions": library_versions(),
        "config": {"model": str(model_dir), "steps_timed": args.steps, "warmup_steps": args.warmup,
                   "prompts_per_step": args.prompts_per_step, "micro_batch_prompts": micro,
                   "grad_accum": args.prompts_per_step // micro, "num_generations": args.num_generations,
                   "completions_per_step": args.prompts_per_step * args.num_generations,
                   "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": 1.0, "top_k": 0,
                   "lr": args.lr, "beta": args.beta, "lora": LORA, "dtype": "fp32", "threads": args.threads,
                   "seed": args.seed, "reward": "arith_reward (last number == answer)",
                   "prompt_tokens": {"min": min(prompt_lengths), "max": max(prompt_lengths),
                                     "mean": statistics.fmean(prompt_lengths)},
                   "posttrain_max_prompt_length": max_prompt_length, "posttrain_set": list(args.posttrain_set)},
        "parts": parts, "contenders": contenders,
    }
    try:
        if "grpo" in parts:
            runs = [run_one(spec("grpo", c), args.run_timeout) for c in contenders]
            report["grpo"] = {"runs": runs, "ratios_posttrain_over_trl": ratios(runs), "ratios": pair_ratios(runs)}
        if "rollout" in parts:
            report["rollout"] = record = run_one(spec("rollout", "rollout"), args.run_timeout)
            if "methods" in record:
                m = record["methods"]
                ours = m["posttrain-engine"]["tokens_per_s"]
                record["ratios_engine_over"] = {k: ours / m[k]["tokens_per_s"] for k in ROLLOUT_METHODS[1:]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    text = ""
    if "grpo" in report:
        text += f"\n## GRPO steps ({device})\n\n" + grpo_table(report["grpo"]["runs"], report["grpo"]["ratios_posttrain_over_trl"])
    if "rollout" in report:
        text += f"\n## Rollout engine vs generate ({device})\n\n" + rollout_table(report["rollout"])
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(f"# GRPO throughput\n\n`{report['command']}`\n" + text)
    print(text + f"\nresults in {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
