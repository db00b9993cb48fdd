"""``rewards:`` and ``guards.rewards:`` config lists -> weighted reward sources with one batch interface.

Each item is one source, with an optional ``name`` and ``weight`` (default 1), and exactly one of:

- ``function: module:function`` (or ``path/to/file.py:function``, or a shipped verifier's short name such as
  ``numeric_match``) with optional ``kwargs:`` and ``timeout:`` (seconds per batch). User code runs in a worker
  subprocess with a time limit (:mod:`posttrain.rewards.functions`); the shipped verifiers run in-process.
- ``reward_model: DIR``: a reward model from ``posttrain rm`` (optional ``model:`` base for an adapter).
- ``judge: {base_url, model, ...}``: an LLM judge behind an OpenAI-compatible endpoint (:mod:`posttrain.rewards.judge`).

Every source is called as ``source(prompts, completions, rows) -> list[float]``, where ``rows`` are the prompt
dataset's other columns. The total is ``sum_i weight_i * score_i``; a NaN score (a function that raised or timed
out, an unparseable judge reply) counts 0 in the total and is counted in ``errors/<name>``, never silently.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError

SOURCE_KEYS = ("function", "reward_model", "judge")
ALLOWED = {"name", "weight", "kwargs", "timeout", "model", *SOURCE_KEYS}


@dataclass
class Source:
    name: str
    weight: float
    fn: Any  # (prompts, completions, rows) -> list[float]; may have .errors and .close()


class RewardModelSource:
    """A ``posttrain rm`` reward model as a batch reward source (scores are the model's raw outputs)."""

    def __init__(self, path: str, base: str | None, device, max_length: int = 1024, name: str = "reward_model"):
        from posttrain.rewards.model import load_reward_model

        self.name, self.errors = name, 0
        self.rm = load_reward_model(path, base=base, max_length=max_length)
        self.rm.model.to(device)

    def __call__(self, prompts: list, completions: list[str], rows: list[dict]) -> list[float]:
        from posttrain.data.formats import SFTExample

        examples = []
        for p, c in zip(prompts, completions, strict=True):
            if isinstance(p, str):
                examples.append(SFTExample("prompt_completion", prompt=p, completion=c))
            else:
                examples.append(SFTExample("chat", messages=[*p, {"role": "assistant", "content": c}], first_trained=len(p)))
        return self.rm.score_examples(examples)


def _check_item(item: object, where: str) -> dict:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with one of {', '.join(SOURCE_KEYS)}, got {item!r}")
    for key in item:
        if key not in ALLOWED:
            close = difflib.get_close_matches(str(key), sorted(ALLOWED), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{where}.{key}: unknown key{hint}; expected {', '.join(sorted(ALLOWED))}")
    kinds = [k for k in SOURCE_KEYS if item.get(k) is not None]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: expected exactly one of {', '.join(SOURCE_KEYS)}, got {', '.join(kinds) or 'none'}")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"{where}.weight: expected a number, got {weight!r}")
    if "kwargs" in item and not isinstance(item["kwargs"], dict):
        raise ConfigError(f"{where}.kwargs: expected a mapping of keyword arguments, got {item['kwargs']!r}")
    return item


def _default_name(item: dict) -> str:
    if item.get("function"):
        return str(item["function"]).rsplit(":", 1)[-1]
    if item.get("reward_model"):
        return "reward_model"
    return "judge"


def build_sources(items: list, key: str, *, device=None, max_length: int = 1024) -> list[Source]:
    """Validate every item of the ``key`` list and build its sources (validation first, before any loading)."""
    from posttrain.rewards.functions import load_reward_function

    checked = [_check_item(item, f"{key}[{i}]") for i, item in enumerate(items)]
    names = [str(item.get("name") or _default_name(item)) for item in checked]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"{key}[{i}].name: {name!r} is used twice; give each source its own name")
    sources = []
    for i, (item, name) in enumerate(zip(checked, names, strict=True)):
        where = f"{key}[{i}]"
        try:
            if item.get("function"):
                fn = load_reward_function(str(item["function"]), item.get("kwargs") or {}, float(item.get("timeout", 30.0)))
            elif item.get("reward_model"):
                fn = RewardModelSource(str(item["reward_model"]), item.get("model"), device, max_length, name)
            else:
                from posttrain.rewards.judge import JudgeReward

                judge = item["judge"]
                if not isinstance(judge, dict) or not judge.get("base_url") or not judge.get("model"):
                    raise ConfigError("judge: expected a mapping with at least base_url and model")
                fn = JudgeReward(name=name, **judge)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:  # an unknown judge option
            raise ConfigError(f"{where}: {e}") from None
        sources.append(Source(name, float(item.get("weight", 1.0)), fn))
    return sources


class RewardSet:
    """Weighted sources; ``score`` returns the totals and each source's raw scores."""

    def __init__(self, sources: list[Source]):
        self.sources = sources

    @classmethod
    def from_config(cls, items: list, key: str = "rewards", **kw) -> RewardSet:
        return cls(build_sources(items, key, **kw))

    def score(self, prompts: list, completions: list[str], rows: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        per_source: dict[str, list[float]] = {}
        totals = [0.0] * len(completions)
        for s in self.sources:
            scores = [float(v) for v in s.fn(prompts, completions, rows)]
            if len(scores) != len(completions):
                raise ConfigError(f"reward {s.name}: returned {len(scores)} scores for {len(completions)} completions")
            per_source[s.name] = scores
            for i, v in enumerate(scores):
                if math.isfinite(v):
                    totals[i] += s.weight * v
        return totals, per_source

    @staticmethod
    def metrics(prefix: str, totals: list[float], per_source: dict[str, list[float]]) -> dict[str, float]:
        """Means for logging: ``<prefix>``, ``<prefix>/<name>`` (NaN scores left out) and the count of NaN scores,
        ``errors/<name>`` for the training reward (``errors/heldout/<name>``, ``errors/guard/<name>`` otherwise), logged even when 0 so every
        process has the same keys."""
        out = {prefix: sum(totals) / max(len(totals), 1)}
        for name, scores in per_source.items():
            good = [v for v in scores if math.isfinite(v)]
            out[f"{prefix}/{name}"] = sum(good) / len(good) if good else float("nan")
            where = "errors" if prefix == "reward" else f"errors/{prefix.split('/')[0]}"
            out[f"{where}/{name}"] = float(len(scores) - len(good))
        return out

    def close(self) -> None:
        for s in self.sources:
            if hasattr(s.fn, "close"):
                s.fn.close()
