"""The ``evals:`` section and :class:`Evaluator`: every configured measurement of one model.

Metrics (a flat dict; :data:`HIGHER_IS_BETTER` says which way each one improves):

- ``task/<name>``: a task set's mean reward over greedy answers to its held-out prompts (scored by the same
  reward sources as GRPO's ``rewards:``: shipped verifiers, functions, reward models, judges), or, for a task
  given as SFT ``data:``, its eval loss (mean NLL per target token; lower is better);
- ``general/accuracy``: share of general questions answered right (the answer mentions an accepted answer);
- ``general/perplexity``: perplexity of the general text's responses (teacher-forced);
- ``general/kl_to_base``: KL(model || base) per response token of the general text, over the whole vocabulary,
  teacher-forced: how far the model's next-token distributions moved from the base model's on ordinary text;
- ``sycophancy/agrees``: of the probe's questions the model answers right when asked neutrally, the share whose
  answer agrees with a false premise the user asserts (``sycophancy/known`` counts them; ``sycophancy/corrects``
  is the share that states the truth despite the premise).

The built-in sets (``builtin``) are in ``posttrain/evals/data`` and described in docs/evals.md; each key takes a
file of the same format instead, or null to skip that measurement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import opt
from posttrain.errors import ConfigError

DATA = Path(__file__).with_name("data")
BUILTIN = {"general_questions": DATA / "general_questions.jsonl", "general_text": DATA / "general_text.jsonl",
           "sycophancy": DATA / "sycophancy.jsonl"}
TASK_KEYS = {"name", "prompts", "rewards", "data", "max_new_tokens", "min_gain", "max_drop"}


def higher_is_better(metric: str) -> bool:
    """Which way a metric improves: eval losses, perplexity, KL and sycophancy go down; rewards and accuracy up."""
    return not (metric.endswith("/loss") or metric in ("general/perplexity", "general/kl_to_base", "sycophancy/agrees"))


@dataclass
class EvalsSection:
    tasks: list[dict] = opt([], "Task sets, each {name, prompts, rewards} (held-out prompt rows answered greedily and scored by the rewards, same items as GRPO's `rewards:`; the metric task/<name> is the mean) or {name, data} (SFT rows; the metric task/<name>/loss is the eval loss). Optional per task: max_new_tokens, min_gain, max_drop (override the gates').")
    general_questions: str | None = opt("builtin", "General questions with accepted answers (prompt + answers rows) the base model gets right; their accuracy measures forgetting. builtin = posttrain's set; a file; or null.")
    general_text: str | None = opt("builtin", "General chat text (SFT rows) for perplexity and KL to the base model. builtin, a file, or null.")
    sycophancy: str | None = opt("builtin", "The sycophancy probe: rows {question, prompt (the question with a false premise asserted), truth, false}. builtin, a file, or null.")
    max_new_tokens: int = opt(48, "Tokens per greedy answer (a task may set its own).")
    batch_size: int = opt(16, "Prompts generated together, and rows per teacher-forced batch.")
    limit: int = opt(0, "Use at most this many rows of each set (0: all): quicker, noisier numbers.")
    samples: int = opt(3, "Answers kept per task set for the report.")

    def validate(self, where: str = "evals") -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.limit < 0 or self.samples < 0:
            raise ConfigError(f"{where}: max_new_tokens and batch_size must be >= 1, limit and samples >= 0")
        names = set()
        for i, task in enumerate(self.tasks):
            at = f"{where}.tasks[{i}]"
            if not isinstance(task, dict):
                raise ConfigError(f"{at}: expected a mapping {{name, prompts, rewards}} or {{name, data}}, got {task!r}")
            unknown = set(task) - TASK_KEYS
            if unknown:
                raise ConfigError(f"{at}: unknown key(s) {sorted(unknown)}; expected some of {sorted(TASK_KEYS)}")
            name = task.get("name")
            if not isinstance(name, str) or not name or "/" in name:
                raise ConfigError(f"{at}.name: required, a name without '/'")
            if name in names:
                raise ConfigError(f"{at}.name: {name!r} is used twice")
            names.add(name)
            if bool(task.get("prompts")) == bool(task.get("data")):
                raise ConfigError(f"{at}: give exactly one of prompts (with rewards) or data (eval loss)")
            if task.get("prompts") and not task.get("rewards"):
                raise ConfigError(f"{at}.rewards: required with prompts, e.g. [{{function: exact_match}}]")
            for key in ("min_gain", "max_drop"):
                if key in task and not isinstance(task[key], (int, float)):
                    raise ConfigError(f"{at}.{key}: expected a number, got {task[key]!r}")

    def task_metric(self, task: dict) -> str:
        return f"task/{task['name']}" + ("/loss" if task.get("data") else "")

    def metric_names(self) -> list[str]:
        names = [self.task_metric(t) for t in self.tasks]
        if self.general_questions:
            names.append("general/accuracy")
        if self.general_text:
            names += ["general/perplexity", "general/kl_to_base"]
        if self.sycophancy:
            names += ["sycophancy/agrees", "sycophancy/corrects"]
        return names


def resolve(path: str | None, key: str, base_dir: Path) -> Path | None:
    """A set's file: the built-in one, a path relative to ``base_dir`` (the recipe's folder), or None."""
    if path is None:
        return None
    if path == "builtin":
        return BUILTIN[key]
    p = Path(path)
    return p if p.is_absolute() else base_dir / p


class Evaluator:
    """Runs every measurement of an :class:`EvalsSection` on models of one tokenizer.

    Construction checks every file and reward source (a bad path or reward is an error before any training);
    sets are read once and reused for every model evaluated. Use as a context manager: reward workers are
    stopped on exit."""

    def __init__(self, cfg: EvalsSection, tokenizer, base_dir: str | Path = ".", where: str = "evals"):
        from posttrain.rewards.registry import RewardSet

        cfg.validate(where)
        self.cfg, self.tokenizer, self.base_dir = cfg, tokenizer, Path(base_dir)
        self.files: dict[str, Path] = {}
        for key in ("general_questions", "general_text", "sycophancy"):
            path = resolve(getattr(cfg, key), key, self.base_dir)
            if path is not None:
                self._check_file(path, f"{where}.{key}")
                self.files[key] = path
        self.rewards: dict[str, RewardSet] = {}
        for i, task in enumerate(cfg.tasks):
            path = resolve(task.get("prompts") or task.get("data"), "", self.base_dir)
            self._check_file(path, f"{where}.tasks[{i}].{'prompts' if task.get('prompts') else 'data'}")
            self.files[f"task:{task['name']}"] = path
            if task.get("prompts"):
                self.rewards[task["name"]] = RewardSet.from_config(task["rewards"], f"{where}.tasks[{i}].rewards")
        self._rows: dict[str, list] = {}

    @staticmethod
    def _check_file(path: Path, key: str) -> None:
        if not path.exists():
            raise ConfigError(f"{key}: {path} not found")

    def close(self) -> None:
        for rs in self.rewards.values():
            rs.close()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ data
    def _limited(self, rows: list) -> list:
        return rows[: self.cfg.limit] if self.cfg.limit else rows

    def _prompt_rows(self, key: str) -> list:
        if key not in self._rows:
            from posttrain.data.prompts import prompt_rows

            self._rows[key] = self._limited(prompt_rows(self.files[key]))
        return self._rows[key]

    def _sft_rows(self, key: str) -> list:
        if key not in self._rows:
            from posttrain.data.dataset import load_sft_dataset

            self._rows[key] = self._limited(load_sft_dataset(str(self.files[key]), self.tokenizer, max_length=1024)[0])
        return self._rows[key]

    def _records(self, key: str, fields: tuple[str, ...]) -> list[dict]:
        if key not in self._rows:
            from posttrain.data.io import read_records
            from posttrain.errors import DataError

            rows = []
            for rec in read_records(str(self.files[key])):
                if rec.error:
                    raise DataError(rec.where, rec.error)
                missing = [f for f in fields if f not in rec.data]
                if missing:
                    raise DataError(rec.where, f"missing field(s) {missing}; expected {list(fields)}")
                rows.append(rec.data)
            self._rows[key] = self._limited(rows)
        return self._rows[key]

    # ------------------------------------------------------------------------------------------ measuring
    def _answers(self, model, prompts: list, max_new_tokens: int | None = None) -> list[str]:
        from posttrain.generation import SamplingConfig, generate

        convs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        greedy = SamplingConfig(max_new_tokens=max_new_tokens or self.cfg.max_new_tokens, temperature=0.0)
        return generate(model, self.tokenizer, convs, greedy, batch_size=self.cfg.batch_size)

    def evaluate(self, model, base=None, progress=None) -> dict:
        """``{"metrics": {...}, "samples": {set: [{prompt, answer}]}, "seconds": s}`` for ``model``.

        ``base`` is the base model for ``general/kl_to_base``; with None, a PEFT model's base is itself with its
        adapter disabled, and a plain model is its own base (KL 0: the base model itself is being evaluated).
        ``progress(text)`` is called before each measurement."""
        import torch

        say = progress or (lambda text: None)
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        samples: dict[str, list[dict]] = {}
        for task in self.cfg.tasks:
            name, key = task["name"], f"task:{task['name']}"
            say(f"task {name}")
            if task.get("prompts"):
                rows = self._prompt_rows(key)
                answers = self._answers(model, [p for p, _ in rows], task.get("max_new_tokens"))
                totals, _ = self.rewards[name].score([p for p, _ in rows], answers, [extra for _, extra in rows])
                metrics[self.cfg.task_metric(task)] = sum(t if math.isfinite(t) else 0.0 for t in totals) / len(totals)
                samples[name] = [{"prompt": _text_of(p), "answer": a, "score": t}
                                 for (p, _), a, t in list(zip(rows, answers, totals))[: self.cfg.samples]]
            else:
                with torch.inference_mode():
                    nll, _ = self._nll_and_kl(model, None, self._sft_rows(key), kl=False)
                metrics[self.cfg.task_metric(task)] = nll
        if "general_questions" in self.files:
            say("general questions")
            rows = self._records("general_questions", ("prompt", "answers"))
            answers = self._answers(model, [r["prompt"] for r in rows])
            from posttrain.evals.scoring import answers_correctly

            right = [answers_correctly(a, r["answers"]) for r, a in zip(rows, answers, strict=True)]
            metrics["general/accuracy"] = sum(right) / len(right)
            samples["general_questions"] = [{"prompt": r["prompt"], "answer": a, "score": float(ok)}
                                            for r, a, ok in list(zip(rows, answers, right))[: self.cfg.samples]]
        if "general_text" in self.files:
            say("general text: perplexity and KL to the base model")
            with torch.inference_mode():
                nll, kl = self._nll_and_kl(model, base, self._sft_rows("general_text"), kl=True)
            metrics["general/perplexity"] = math.exp(min(nll, 50.0))
            metrics["general/kl_to_base"] = kl
        if "sycophancy" in self.files:
            say("sycophancy probe")
            metrics.update(self._sycophancy(model, samples))
        return {"metrics": metrics, "samples": samples, "seconds": round(time.perf_counter() - start, 1)}

    def _sycophancy(self, model, samples: dict) -> dict:
        from posttrain.evals.scoring import answers_correctly, premise_verdict

        rows = self._records("sycophancy", ("question", "prompt", "truth", "false"))
        neutral = self._answers(model, [r["question"] for r in rows])
        pushed = self._answers(model, [r["prompt"] for r in rows])
        known = [i for i, (r, a) in enumerate(zip(rows, neutral, strict=True)) if answers_correctly(a, r["truth"])]
        judged = known or list(range(len(rows)))  # a model that knows none of them: over all questions
        verdicts = [premise_verdict(pushed[i], rows[i]["truth"], rows[i]["false"]) for i in judged]
        samples["sycophancy"] = [{"prompt": rows[i]["prompt"], "answer": pushed[i], "verdict": v}
                                 for i, v in list(zip(judged, verdicts))[: self.cfg.samples]]
        return {"sycophancy/agrees": verdicts.count("agrees") / len(verdicts),
                "sycophancy/corrects": verdicts.count("corrects") / len(verdicts),
                "sycophancy/known": float(len(known))}

    def _nll_and_kl(self, model, base, rows: list, kl: bool) -> tuple[float, float]:
        """Mean NLL per target token, and mean KL(model || base) per target token over the full vocabulary."""
        import torch.nn.functional as F

        from posttrain.data.batching import collate_sft
        from posttrain.models.adapters import is_peft

        was_training = model.training
        model.eval()
        nll_sum, kl_sum, tokens = 0.0, 0.0, 0
        try:
            for start in range(0, len(rows), self.cfg.batch_size):
                batch = collate_sft(rows[start : start + self.cfg.batch_size], self.tokenizer.pad_token_id)
                batch = {k: v.to(model.device) for k, v in batch.items()}
                logp = _target_log_softmax(model, batch)  # (N, V)
                targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
                nll_sum -= float(logp.gather(1, targets[:, None]).sum())
                tokens += targets.numel()
                if not kl:
                    continue
                if base is not None:
                    base_logp = _target_log_softmax(base, batch)
                elif is_peft(model):
                    with model.disable_adapter():
                        base_logp = _target_log_softmax(model, batch)
                else:
                    base_logp = logp
                kl_sum += float(F.kl_div(base_logp, logp, log_target=True, reduction="sum"))
        finally:
            model.train(was_training)
        tokens = max(tokens, 1)
        return nll_sum / tokens, kl_sum / tokens


def _target_log_softmax(model, batch: dict):
    """fp32 log-softmax of the next-token distributions at the positions that predict a target token: (N, V)."""
    import torch

    input_ids, labels = batch["input_ids"], batch["labels"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -input_ids.shape[1]:]  # prompt tuning prepends virtual positions
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100
    return torch.log_softmax(logits[predicts].float(), dim=-1)


def _text_of(prompt) -> str:
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
