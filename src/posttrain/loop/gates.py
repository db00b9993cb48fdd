"""Promotion gates of ``posttrain loop``: a candidate serves only if it is better where it was trained to be, no
worse at what the model already knew, and shows no sign of reward hacking. Pure functions of two metric dicts
(the serving version's and the candidate's, from :func:`posttrain.loop.run.evaluate_version`), so every rule is
tested on numbers made by hand.

Metrics (present when their data is configured):

- ``reward``: mean reward of greedy answers to the held-out prompts (the improvement gate);
- ``preference_accuracy``: share of held-out pairs whose chosen response has the higher summed log-prob
  (the improvement gate for preference data);
- ``perplexity``: on a general held-out text set (forgetting);
- ``task_accuracy``: mean reward on a fixed task set (forgetting);
- ``mean_words``, ``duplicate_share``: of the held-out answers (reward-hacking guards: an answer length that
  jumps, or answers collapsing into copies of each other, are how hacked rewards show; see docs/rl.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from posttrain.config import opt


@dataclass
class GatesSection:
    prompts: str | None = opt(None, "Held-out prompts (prompt/messages rows; other columns reach the rewards) both versions answer greedily.")
    rewards: list[dict] = opt([], "Rewards scoring those answers (same items as GRPO's `rewards:`); their mean is the `reward` metric.")
    min_reward_gain: float = opt(0.0, "The candidate's mean reward must exceed the serving version's by more than this.")
    preference_data: str | None = opt(None, "Held-out preference pairs: the candidate's pairwise accuracy must exceed the serving version's by more than min_preference_gain.")
    min_preference_gain: float = opt(0.0, "Required gain in held-out pairwise accuracy.")
    general_data: str | None = opt(None, "General held-out text (SFT rows) whose perplexity must not rise by more than max_perplexity_increase (forgetting).")
    max_perplexity_increase: float = opt(0.05, "Largest relative perplexity increase allowed (0.05 = 5%).")
    task_prompts: str | None = opt(None, "A fixed task set (prompt rows with answer columns) whose accuracy must not drop by more than max_task_drop (forgetting).")
    task_rewards: list[dict] = opt([{"function": "numeric_match"}], "Rewards that score the task set (default numeric_match against `answer`).")
    max_task_drop: float = opt(0.05, "Largest absolute drop in task accuracy allowed.")
    max_length_change: float = opt(0.5, "Guard: largest relative change of the mean answer length (words) on `prompts`.")
    max_duplicate_share: float = opt(0.5, "Guard: largest share of held-out answers that duplicate another answer.")
    max_new_tokens: int = opt(64, "Tokens per greedy held-out answer.")


class Verdict:
    """Gates collected one by one: each adds a line "pass: ..." or "FAIL: ..." with its numbers; ``ok`` is False
    once any gate failed. Shared by the loop's promotion gates and the pipeline's stage gates."""

    def __init__(self) -> None:
        self.ok = True
        self.reasons: list[str] = []

    def gate(self, passed: bool, text: str) -> bool:
        self.ok = self.ok and passed
        self.reasons.append(("pass: " if passed else "FAIL: ") + text)
        return passed

    def gain(self, label: str, before: float, after: float, min_gain: float, higher: bool = True) -> bool:
        """``after`` must beat ``before`` by more than ``min_gain`` (in the metric's better direction)."""
        gain = (after - before) if higher else (before - after)
        return self.gate(gain > min_gain, f"{label} {before:.3f} -> {after:.3f} (gain {gain:+.3f}, needs > {min_gain:+.3f})")

    def drop(self, label: str, before: float, after: float, max_drop: float, higher: bool = True) -> bool:
        """``after`` may be worse than ``before`` by at most ``max_drop`` (absolute)."""
        drop = (before - after) if higher else (after - before)
        return self.gate(drop <= max_drop, f"{label} {before:.3f} -> {after:.3f} (drop {drop:+.3f}, at most {max_drop:.3f})")

    def relative_rise(self, label: str, before: float, after: float, max_rise: float) -> bool:
        """``after`` may exceed ``before`` by at most ``max_rise`` relative (0.05 = 5%)."""
        rise = after / before - 1.0 if before else math.inf
        return self.gate(rise <= max_rise, f"{label} {before:.3f} -> {after:.3f} ({rise:+.1%}, at most {max_rise:+.1%})")

    def at_most(self, label: str, value: float, limit: float) -> bool:
        return self.gate(value <= limit, f"{label} {value:.3f} (at most {limit:.3f})")


def check(serving: dict, candidate: dict, g: GatesSection) -> tuple[bool, list[str]]:
    """(promote?, reasons): one line per gate, each saying pass or fail with the numbers."""
    v = Verdict()
    improved = False
    if "reward" in candidate:
        improved = True
        v.gain("held-out reward", serving["reward"], candidate["reward"], g.min_reward_gain)
    if "preference_accuracy" in candidate:
        improved = True
        v.gain("held-out preference accuracy", serving["preference_accuracy"], candidate["preference_accuracy"],
               g.min_preference_gain)
    if not improved:
        v.gate(False, "no improvement gate is configured (gates.prompts + gates.rewards, or gates.preference_data)")
    if "perplexity" in candidate:
        v.relative_rise("general perplexity", serving["perplexity"], candidate["perplexity"], g.max_perplexity_increase)
    if "task_accuracy" in candidate:
        v.drop("fixed-task accuracy", serving["task_accuracy"], candidate["task_accuracy"], g.max_task_drop)
    if "mean_words" in candidate and serving.get("mean_words"):
        change = candidate["mean_words"] / serving["mean_words"] - 1.0
        v.gate(abs(change) <= g.max_length_change, f"answer length {serving['mean_words']:.1f} -> "
               f"{candidate['mean_words']:.1f} words ({change:+.0%}, at most +/-{g.max_length_change:.0%})")
    if "duplicate_share" in candidate:
        v.gate(candidate["duplicate_share"] <= g.max_duplicate_share, f"duplicate answers "
               f"{candidate['duplicate_share']:.0%} (at most {g.max_duplicate_share:.0%})")
    return v.ok, v.reasons
