"""``posttrain score``: score prompt/response pairs with a reward model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.config import opt
from posttrain.errors import ConfigError

if TYPE_CHECKING:
    from posttrain.data.formats import SFTExample

HELP = "Score prompt/response pairs with a reward model from `posttrain rm`."
EXAMPLES = "posttrain score reward_model=runs/rm data=prefs.jsonl\n  posttrain score reward_model=runs/rm prompt='Hi' response='[\"Hello!\", \"Go away.\"]'"


@dataclass
class ScoreConfig:
    reward_model: str | None = opt(None, "A reward model from `posttrain rm`: its output directory (a full model, or an adapter) (required).")
    model: str | None = opt(None, "Base model under an adapter reward model; default: the one the adapter was trained on.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    data: str | None = opt(None, "Rows to score: prompt+completion, messages (the last assistant turn is the response), or prompt+chosen+rejected (both scored).")
    prompt: str | None = opt(None, "One prompt to score a response to (with `response`).")
    response: list[str] | str | None = opt(None, "One or more responses to `prompt`.")
    output: str | None = opt(None, "Write the scores as JSONL here (one row per input row) as well as printing them.")
    batch_size: int = opt(16, "Sequences per forward pass.")
    max_length: int = opt(1024, "Longer sequences are truncated (and counted).")


Config = ScoreConfig


def _score_rows(path: str) -> tuple[list[SFTExample], list[tuple[int, str]]]:
    """Examples to score from a data file, and for each its (row index, field name)."""
    from posttrain.data.formats import normalize_prompt_completion, normalize_sft
    from posttrain.data.io import read_records
    from posttrain.data.preference import normalize_pair
    from posttrain.errors import DataError

    examples, where = [], []
    for i, rec in enumerate(read_records(path)):
        if rec.error:
            raise DataError(rec.where, rec.error)
        data = rec.data
        try:
            if data.get("chosen") is not None or data.get("rejected") is not None:
                chosen, rejected = normalize_pair(data)
                examples += [chosen, rejected]
                where += [(i, "chosen"), (i, "rejected")]
            elif data.get("response") is not None:
                examples.append(normalize_prompt_completion(data.get("prompt", ""), data["response"], "response"))
                where.append((i, "response"))
            else:
                examples.append(normalize_sft(data))
                where.append((i, "completion"))
        except ValueError as e:
            raise DataError(rec.where, str(e)) from e
    return examples, where


def run(cfg: ScoreConfig) -> list[dict]:
    """Print (and optionally write) the reward of each prompt/response."""
    import json

    from posttrain.rewards.model import load_reward_model

    if not cfg.reward_model:
        raise ConfigError("reward_model: required (the output directory of `posttrain rm`)")
    if not cfg.data and not (cfg.prompt is not None and cfg.response):
        raise ConfigError("give data=<file> or prompt=... response=... (response may be a list)")
    if cfg.data:
        examples, where = _score_rows(cfg.data)
    else:
        from posttrain.data.formats import normalize_prompt_completion

        responses = [cfg.response] if isinstance(cfg.response, str) else cfg.response
        try:
            examples = [normalize_prompt_completion(cfg.prompt, r, "response") for r in responses]
        except ValueError as e:
            raise ConfigError(str(e)) from e
        where = [(i, "response") for i in range(len(examples))]
    rm = load_reward_model(cfg.reward_model, cfg.model, cfg.trust_remote_code, cfg.max_length)
    scores = rm.score_examples(examples, cfg.batch_size)
    rows: dict[int, dict] = {}
    for (i, field), ex, s in zip(where, examples, scores):
        rows.setdefault(i, {"row": i + 1})[f"reward_{field}" if field != "completion" else "reward"] = s
        shown = ex.completion if ex.kind == "prompt_completion" else ex.messages[-1]["content"]
        print(f"{s:+.4f}  row {i + 1} {field}: {shown[:100]!r}")
    out = list(rows.values())
    for r in out:
        if "reward_chosen" in r and "reward_rejected" in r:
            r["chosen_preferred"] = r["reward_chosen"] > r["reward_rejected"]
    pairs = [r for r in out if "chosen_preferred" in r]
    if pairs:
        acc = sum(r["chosen_preferred"] for r in pairs) / len(pairs)
        print(f"pairwise accuracy: {acc:.1%} of {len(pairs)} pairs rank chosen above rejected")
    if cfg.output:
        Path(cfg.output).write_text("".join(json.dumps(r) + "\n" for r in out))
        print(f"scores written to {cfg.output}")
    return out
