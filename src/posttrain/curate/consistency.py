"""Style consistency and language mix of a dataset's responses: the audit's ``consistency`` and ``language`` sections.

A model imitates its data's style as much as its content. Trained on a set where 40% of the answers use markdown
and 60% are plain prose, it formats at random; trained on a few answers in French among English ones, it sometimes
answers an English question in French. This module measures both, per response, with pure functions.

Which texts count: the responses training pushes the model toward (:func:`target_turns`): every trained assistant
turn of an SFT row, a pair's chosen reply, and an unpaired completion labelled desirable. Rejected and undesirable
replies are meant to differ, so they are left out. Each response is measured against its prompt: the last user
turn before it (none for ``text`` rows).

**Style features** (:func:`style_features`), looked for outside code blocks and inline code:

- markdown: ``header`` (``# Title``), ``bullet_list``, ``numbered_list``, ``bold`` (``**x**``), ``table`` (a
  ``|---|---|`` separator row), ``code_fence`` (looked for in the whole text), and ``markdown``: any of the first
  five;
- person: ``first_person`` (I, me, my, mine, myself), ``second_person`` (you, your...), ``we`` (we, us, our...);
- tone: ``exclamation``, ``emoji``, ``hedge`` (perhaps, maybe, possibly, I think, I believe, I guess, it seems,
  not sure), ``apology`` (sorry, apologise/apologize, apologies);
- ``length_ratio``: response words / prompt words (a CJK character counts as a word); none without a prompt.

**The "mixed" rule.** A feature is flagged when both styles are common: its share of responses is between
``MIXED_SHARE`` (10%) and 90%, out of at least ``MIN_RESPONSES`` (10) responses. Below 10% the other style is a
handful of outliers; above it, it is a second convention the model will learn to pick at random. Only the
features that are a matter of convention are flagged: ``markdown``, ``first_person``, ``exclamation``, ``emoji``,
``hedge`` and ``apology``. Code fences, the individual markdown elements, "you" and "we" follow the content (a
coding question gets code, a list of steps gets a list, instructions address the reader), so their shares are
reported but never flagged. The length ratio is flagged when it is bimodal: the best split of log10(ratio) in two
groups (1-D 2-means) gives group centres at least 10x apart, separated by at least 3 within-group standard
deviations (Ashman's D >= 3; one bell curve split in two gives D of about 2.7), with the smaller group holding
at least 10% of the responses: terse answers to some prompts and essays to others. Each flag lists the rows
of the minority style.

**Language** (:func:`detect_language`): ``py3langid`` (BSD-3, a maintained fork of langid.py, whose naive Bayes
model over byte n-grams of 97 languages ships inside the package: nothing is downloaded at run time). Code
blocks, inline code and URLs are removed first, and the first ``MAX_LANGUAGE_CHARS`` (400) characters read; a text with fewer than ``MIN_LETTERS`` (20) letters, or whose
normalised top probability is under ``MIN_CONFIDENCE`` (0.5), is ``"und"`` (undetermined) rather than a guess:
"Paris." or "42" has no language. Responses in another language than the majority are listed, and so are
prompt/response pairs detected in two different languages, except where the prompt asks for a translation.

``summary.json`` keys: ``consistency`` = ``{"responses", "shares": {feature: share}, "length_ratio": {"responses",
"median", "q25", "q75", "iqr"}, "mixed": [{"feature", "share", "minority", "minority_responses", "examples"}]}``;
``language`` = ``{"responses", "distribution": {code: responses}, "majority", "other_language": n,
"other_language_examples", "prompt_mismatch": n, "prompt_mismatch_examples"}``.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posttrain.curate.rows import Row

MIXED_SHARE = 0.1
MIN_RESPONSES = 10
LENGTH_RATIO_GAP = 1.0  # log10: the two groups' centres are 10x apart
LENGTH_RATIO_SEPARATION = 3.0  # Ashman's D
MIN_LETTERS = 20
MIN_CONFIDENCE = 0.5
MAX_LANGUAGE_CHARS = 400  # langid is reliable well below this, and its time grows with the length
MAX_EXAMPLES = 5

_FENCED = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^ {0,3}\1[ \t]*$|\Z)", re.DOTALL | re.MULTILINE)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_URL = re.compile(r"https?://\S+|www\.\S+")
# Markdown and punctuation: (pattern, characters one of which it needs: a cheap test that skips most searches).
_PATTERNS: dict[str, tuple[re.Pattern, str]] = {
    "header": (re.compile(r"^ {0,3}#{1,6}[ \t]+\S", re.MULTILINE), "#"),
    "bullet_list": (re.compile(r"^[ \t]*[-*+][ \t]+\S", re.MULTILINE), "-*+"),
    "numbered_list": (re.compile(r"^[ \t]*\d{1,3}[.)][ \t]+\S", re.MULTILINE), ".)"),
    "bold": (re.compile(r"\*\*(?=\S)[^*\n]+?(?<=\S)\*\*"), "*"),
    "table": (re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(?:\|[ \t]*:?-{3,}:?[ \t]*)+\|?[ \t]*$", re.MULTILINE), "|"),
    "exclamation": (re.compile(r"!(?=[\s\"')\]]|$)"), "!"),
    "emoji": (re.compile("[\U0001F300-\U0001FAFF\U0001F1E6-\U0001F1FF\u2600-\u27BF]"), ""),  # "": non-ASCII text
}
# Person and tone markers, by word. Case matters for "I" (not "i") and "us" ("US" is the country).
_CASED_WORDS = {
    "first_person": {"I", "me", "Me", "my", "My", "mine", "Mine", "myself", "Myself"},
    "we": {"we", "We", "us", "Us", "our", "Our", "ours", "Ours", "ourselves", "Ourselves"},
}
_WORDS = {
    "second_person": {"you", "your", "yours", "yourself", "yourselves"},
    "hedge": {"perhaps", "maybe", "possibly"},
    "apology": {"sorry", "apologies", "apologise", "apologize", "apologised", "apologized", "apologises", "apologizes"},
}
_HEDGE_BIGRAMS = {("i", "think"), ("i", "believe"), ("i", "guess"), ("it", "seems"), ("not", "sure")}
_TOKEN = re.compile(r"\w+")
MARKDOWN_PARTS = ("header", "bullet_list", "numbered_list", "bold", "table")
FEATURES = ("markdown", *MARKDOWN_PARTS, "code_fence", "first_person", "second_person", "we",
            "exclamation", "emoji", "hedge", "apology")
FLAGGED = ("markdown", "first_person", "exclamation", "emoji", "hedge", "apology")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_TRANSLATION = re.compile(r"translat|traduc|übersetz", re.IGNORECASE)


def target_turns(row: Row, data: dict) -> list[tuple[str, str]]:
    """(prompt, response) for each response training pushes the model toward: trained assistant turns of an SFT
    row, a pair's chosen reply, an unpaired completion whose label is true. The prompt is the last user turn
    before the response ("" if none)."""
    if row.kind == "unpaired" and data.get("label") is not True:
        return []
    example = row.examples[0]  # a pair's chosen; an SFT or unpaired row's only example
    if example.kind == "prompt_completion":
        return [(example.prompt, example.completion)]
    if example.kind == "text":
        return [("", example.text)]
    turns, prompt = [], ""
    for i, message in enumerate(example.messages):
        if message["role"] == "user":
            prompt = message["content"]
        elif message["role"] == "assistant" and i >= example.first_trained:
            turns.append((prompt, message["content"]))
    return turns


def _has_fence(text: str) -> bool:
    return ("```" in text or "~~~" in text) and _FENCED.search(text) is not None


def prose(text: str) -> str:
    """``text`` without fenced code blocks, inline code and URLs: what style and language are read from."""
    if _has_fence(text):
        text = _FENCED.sub("\n", text)
    if "`" in text:
        text = _INLINE_CODE.sub(" ", text)
    if "http" in text or "www." in text:
        text = _URL.sub(" ", text)
    return text


def style_features(response: str) -> frozenset[str]:
    """The names (from ``FEATURES``) of the style features ``response`` shows."""
    text = prose(response)
    found = {name for name, (pattern, needs) in _PATTERNS.items()
             if (any(c in text for c in needs) if needs else not text.isascii()) and pattern.search(text)}
    words = _TOKEN.findall(text)
    cased = set(words)
    lowered = [w.lower() for w in words]
    found |= {name for name, markers in _CASED_WORDS.items() if cased & markers}
    found |= {name for name, markers in _WORDS.items() if markers.intersection(lowered)}
    if not set(zip(lowered, lowered[1:])).isdisjoint(_HEDGE_BIGRAMS):
        found.add("hedge")
    if found & set(MARKDOWN_PARTS):
        found.add("markdown")
    if _has_fence(response):
        found.add("code_fence")
    return frozenset(found)


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def length_ratio(prompt: str, response: str) -> float | None:
    """Response words / prompt words; None when there is no prompt to compare with."""
    prompt_words = word_count(prompt)
    return max(word_count(response), 1) / prompt_words if prompt_words else None


def _two_groups(values: list[float]) -> tuple[int, float, float, float, float]:
    """The best split of sorted ``values`` in two (least within-group squared error): (index where the second
    group starts, mean and standard deviation of each group)."""
    n = len(values)
    prefix, prefix_sq = [0.0], [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
        prefix_sq.append(prefix_sq[-1] + v * v)

    def sse(a: int, b: int) -> float:
        total = prefix[b] - prefix[a]
        return prefix_sq[b] - prefix_sq[a] - total * total / (b - a)

    k = min(range(1, n), key=lambda k: sse(0, k) + sse(k, n))
    low, high = values[:k], values[k:]
    return k, statistics.fmean(low), statistics.pstdev(low), statistics.fmean(high), statistics.pstdev(high)


def bimodal_split(log_ratios: list[float]) -> float | None:
    """The log10 threshold between two clearly separate length-ratio groups (see the module docstring), or None."""
    values = sorted(log_ratios)
    n = len(values)
    if n < MIN_RESPONSES:
        return None
    k, mean_low, sd_low, mean_high, sd_high = _two_groups(values)
    spread = math.sqrt((sd_low**2 + sd_high**2) / 2)
    separation = math.inf if spread == 0 else (mean_high - mean_low) / spread
    if (mean_high - mean_low >= LENGTH_RATIO_GAP and separation >= LENGTH_RATIO_SEPARATION
            and min(k, n - k) >= MIXED_SHARE * n):
        return (values[k - 1] + values[k]) / 2
    return None


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class StyleTally:
    """Style features of every response, added one at a time; :meth:`summary` applies the mixed rule."""

    items: list[tuple[str, frozenset[str], float | None]] = field(default_factory=list)  # (where, features, ratio)
    _distinct: dict[frozenset[str], frozenset[str]] = field(default_factory=dict, repr=False)  # one copy of each set

    def add(self, where: str, prompt: str, response: str) -> None:
        features = style_features(response)
        features = self._distinct.setdefault(features, features)
        self.items.append((where, features, length_ratio(prompt, response)))

    def summary(self) -> dict:
        n = len(self.items)
        shares = {f: sum(f in feats for _, feats, _ in self.items) / n if n else 0.0 for f in FEATURES}
        ratios = sorted(r for _, _, r in self.items if r is not None)
        out: dict = {"responses": n, "shares": shares, "length_ratio": {"responses": len(ratios)}, "mixed": []}
        if ratios:
            q25, q75 = _quantile(ratios, 0.25), _quantile(ratios, 0.75)
            out["length_ratio"].update(median=_quantile(ratios, 0.5), q25=q25, q75=q75, iqr=q75 - q25)
        if n >= MIN_RESPONSES:
            for feature in FLAGGED:
                share = shares[feature]
                if MIXED_SHARE <= share <= 1 - MIXED_SHARE:
                    minority_has = share <= 0.5
                    rows = [w for w, feats, _ in self.items if (feature in feats) == minority_has]
                    out["mixed"].append({"feature": feature, "share": share,
                                         "minority": f"{'with' if minority_has else 'without'} {feature}",
                                         "minority_responses": len(rows), "examples": rows[:MAX_EXAMPLES]})
        logs = [(w, math.log10(r)) for w, _, r in self.items if r is not None]
        threshold = bimodal_split([v for _, v in logs])
        if threshold is not None:
            low = [(w, v) for w, v in logs if v <= threshold]
            high = [(w, v) for w, v in logs if v > threshold]
            minority, majority = (low, high) if len(low) < len(high) else (high, low)
            label = "long" if minority is high else "short"
            medians = [10 ** statistics.median(v for _, v in group) for group in (minority, majority)]
            out["mixed"].append({"feature": "length_ratio", "share": len(minority) / len(logs),
                                 "minority": f"{label} responses (median ratio {medians[0]:.3g} vs {medians[1]:.3g})",
                                 "minority_responses": len(minority),
                                 "examples": [w for w, _ in minority[:MAX_EXAMPLES]]})
        return out


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> list[str]:
    """The ISO 639 codes :func:`detect_language` can return (besides ``"und"``)."""
    return _identifier().labels


def detect_language(text: str) -> str:
    """The ISO 639 code of ``text``'s language, or ``"und"`` when there is too little prose to tell or the model
    is unsure (see the module docstring)."""
    text = prose(text)[:MAX_LANGUAGE_CHARS]
    if sum(c.isalpha() for c in text) < MIN_LETTERS:
        return "und"
    language, probability = _identifier().classify(text)
    return language if probability >= MIN_CONFIDENCE else "und"


@dataclass
class LanguageTally:
    """The language of every response (and of its prompt), added one at a time."""

    items: list[tuple[str, str, str | None]] = field(default_factory=list)  # (where, response lang, prompt lang)

    def add(self, where: str, prompt: str, response: str) -> None:
        asks_translation = not prompt.strip() or _TRANSLATION.search(prompt)
        self.items.append((where, detect_language(response), None if asks_translation else detect_language(prompt)))

    def summary(self) -> dict:
        distribution: dict[str, int] = {}
        for _, language, _ in self.items:
            distribution[language] = distribution.get(language, 0) + 1
        determined = {k: v for k, v in distribution.items() if k != "und"}
        majority = max(determined, key=determined.get) if determined else None
        other = [f"{w} ({lang})" for w, lang, _ in self.items if lang not in ("und", majority)]
        mismatch = [f"{w} (prompt {p}, response {r})" for w, r, p in self.items
                    if p not in (None, "und") and r != "und" and p != r]
        return {"responses": len(self.items),
                "distribution": dict(sorted(distribution.items(), key=lambda kv: -kv[1])), "majority": majority,
                "other_language": len(other), "other_language_examples": other[:MAX_EXAMPLES],
                "prompt_mismatch": len(mismatch), "prompt_mismatch_examples": mismatch[:MAX_EXAMPLES]}


def consistency_markdown(consistency: dict, language: dict) -> list[str]:
    """The report's Markdown for the two summary sections."""
    shares = consistency["shares"]
    used = ", ".join(f"{f} {shares[f]:.0%}" for f in FEATURES if shares[f] > 0) or "no markdown, person or tone markers"
    lines = ["## Consistency", "", f"{consistency['responses']} responses; {used}."]
    ratio = consistency["length_ratio"]
    if ratio["responses"]:
        lines.append(f"Length ratio response/prompt (words): median {ratio['median']:.3g}, "
                     f"IQR {ratio['q25']:.3g}-{ratio['q75']:.3g}.")
    lines.append("")
    for m in consistency["mixed"]:
        lines.append(f"- mixed {m['feature']}: {m['minority_responses']} responses {m['minority']} "
                     f"(e.g. {', '.join(m['examples'])})")
    if consistency["mixed"]:
        lines.append("")
    dist = ", ".join(f"{k} {v}" for k, v in language["distribution"].items()) or "no responses"
    if "und" in language["distribution"]:
        dist += " (und: too short to tell, or unsure)"
    if language["majority"] is None:
        lines += ["## Language", "", f"{dist}: no response has enough prose to tell its language", ""]
        return lines
    lines += ["## Language", "", f"{dist}; {language['other_language']} responses not in the majority language "
              f"{language['majority']}, {language['prompt_mismatch']} answer their prompt in another language", ""]
    examples = ([f"- other language: {e}" for e in language["other_language_examples"]]
                + [f"- answered in another language: {e}" for e in language["prompt_mismatch_examples"]])
    lines += examples + ([""] if examples else [])
    return lines


def language_outside(turns: list[tuple[str, str]], allowed: list[str]) -> str | None:
    """The first language outside ``allowed`` that a prompt or response of ``turns`` is confidently written in
    (undetermined texts, too short to tell, never count), or None."""
    for prompt, response in turns:
        for text in (prompt, response):
            language = detect_language(text) if text.strip() else "und"
            if language not in allowed and language != "und":
                return language
    return None
