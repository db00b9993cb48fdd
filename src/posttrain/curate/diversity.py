"""How diverse a dataset is: pure functions behind the audit's diversity section.

- **distinct-n** (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"):
  distinct word n-grams over all n-grams of the responses; 1.0 means no n-gram repeats.
- **instruction patterns**: the first :data:`PATTERN_WORDS` lowercased words of each row's instruction (the first
  user turn, or the prompt). An opening of :data:`PATTERN_FLAG_SHARE` or more of the rows (and at least
  :data:`PATTERN_FLAG_MIN_ROWS` rows) is flagged: the set leans on one template ("write a python ...").
- **topic clusters**: spherical k-means on unit sentence embeddings (k-means++ seeding, Arthur & Vassilvitskii
  2007; Lloyd iterations with centroids renormalised, Dhillon & Modha 2001), then per cluster its share of
  rows and its most distinctive words, and the effective number of clusters ``exp(entropy of the shares)``:
  k when all clusters are the same size, near 1 when one cluster holds almost everything.

Distinctive words score ``p(w|c) * log(p(w|c) / p(w))``, with ``p`` the share of rows containing the word in
the cluster and overall: the word's term in the KL divergence of the cluster from the whole set, a tf-idf
whose "idf" is measured against the corpus. Words spread evenly over clusters ("the", "is") score about 0,
so no stop-word list is needed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from posttrain.data.formats import SFTExample

PATTERN_WORDS = 3
PATTERN_FLAG_SHARE = 0.10
PATTERN_FLAG_MIN_ROWS = 5  # 2 rows of 12 are not a template
MAX_CLUSTERS = 20

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def words(text: str) -> list[str]:
    """Lowercased words (letters and digits, inner apostrophes kept: "don't")."""
    return _WORD.findall(text.casefold())


class DistinctNgrams:
    """:func:`distinct_n` over texts added one at a time, for a streaming pass: holds each distinct n-gram
    once, never the texts."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._seen: set[tuple[str, ...]] = set()
        self._total = 0

    def add(self, text: str) -> None:
        w = words(text)
        grams = [tuple(w[i : i + self.n]) for i in range(len(w) - self.n + 1)]
        self._total += len(grams)
        self._seen.update(grams)

    def value(self) -> float | None:
        return len(self._seen) / self._total if self._total else None


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct word ``n``-grams / all word ``n``-grams over ``texts`` (n-grams do not cross texts); None if
    there are none."""
    tally = DistinctNgrams(n)
    for text in texts:
        tally.add(text)
    return tally.value()


def instruction_text(example: SFTExample) -> str:
    """What the row asks: its first user turn (chat), its prompt (prompt/completion), or its text."""
    if example.kind == "chat":
        return next((m["content"] for m in example.messages if m["role"] == "user"), "")
    if example.kind == "prompt_completion":
        return example.prompt
    return example.text


def instruction_pattern(text: str, n_words: int = PATTERN_WORDS) -> str:
    """The first ``n_words`` lowercased words of ``text``, joined by spaces ("" for a text with no words)."""
    return " ".join(words(text)[:n_words])


def top_patterns(patterns: Iterable[str], top: int = 10) -> list[tuple[str, int, float]]:
    """The ``top`` most frequent non-empty patterns as ``(pattern, rows, share of all rows)``, most frequent
    first (ties by pattern, so the order is deterministic)."""
    patterns = list(patterns)
    counts = Counter(p for p in patterns if p)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [(p, c, c / len(patterns)) for p, c in ranked]


def flagged_patterns(top: Iterable[tuple[str, int, float]]) -> list[str]:
    """The patterns of :func:`top_patterns` output that open at least PATTERN_FLAG_SHARE of the rows, and at
    least PATTERN_FLAG_MIN_ROWS rows."""
    return [p for p, rows, share in top if share >= PATTERN_FLAG_SHARE and rows >= PATTERN_FLAG_MIN_ROWS]


def default_clusters(n_rows: int) -> int:
    """``min(round(sqrt(n/2)), 20)``, the rule of thumb k ~ sqrt(n/2), capped to stay readable; at least 1."""
    return max(1, min(round(math.sqrt(n_rows / 2)), MAX_CLUSTERS))


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means of the unit rows of ``x`` ``(n, d)``: ``(labels (n,), unit centroids (k, d))``.

    Deterministic for a given ``seed``. A cluster that empties is reseeded with the row farthest from its
    centroid. Stops when no label changes or after ``iters`` rounds.
    """
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of rows ({n}), got {k}")
    rng = np.random.default_rng(seed)
    # k-means++ seeding, with 1 - cosine as the distance (the squared Euclidean distance of unit rows / 2).
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = x[rng.integers(n)]
    dist = 1.0 - x @ centroids[0]  # (n,)
    for c in range(1, k):
        weights = np.clip(dist, 0.0, None).astype(np.float64)
        chosen = rng.choice(n, p=weights / weights.sum()) if weights.sum() > 0 else rng.integers(n)
        centroids[c] = x[chosen]
        dist = np.minimum(dist, 1.0 - x @ centroids[c])
    labels = np.full(n, -1)
    for _ in range(iters):
        sims = x @ centroids.T  # (n, k)
        new = sims.argmax(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if len(members) == 0:
                farthest = int(sims[np.arange(n), labels].argmin())
                labels[farthest] = c
                members = x[farthest : farthest + 1]
            mean = members.mean(axis=0)
            centroids[c] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return labels, centroids


def effective_clusters(sizes: Sequence[int]) -> float:
    """``exp`` of the entropy of the cluster-size distribution: between 1 and the number of non-empty clusters."""
    total = sum(sizes)
    shares = [s / total for s in sizes if s]
    return math.exp(-sum(p * math.log(p) for p in shares))


def distinctive_words(texts: Sequence[str], labels: Sequence[int], k: int, top: int = 5,
                      min_rows: int = 2) -> list[list[str]]:
    """Per cluster ``0..k-1``, its ``top`` words by ``p(w|c) * log(p(w|c) / p(w))`` over rows containing the
    word (see the module docstring); a word must occur in ``min_rows`` rows of the cluster, be longer than
    two characters and not be a number."""
    overall: Counter = Counter()
    per_cluster = [Counter() for _ in range(k)]
    sizes = Counter(int(c) for c in labels)
    for text, c in zip(texts, labels):
        vocab = {w for w in words(text) if len(w) > 2 and not w.isdigit()}
        overall.update(vocab)
        per_cluster[int(c)].update(vocab)
    n = len(texts)
    out = []
    for c in range(k):
        scored = []
        for w, rows in per_cluster[c].items():
            if rows < min_rows:
                continue
            p_c, p = rows / sizes[c], overall[w] / n
            scored.append((p_c * math.log(p_c / p), w))
        scored.sort(key=lambda sw: (-sw[0], sw[1]))
        out.append([w for score, w in scored[:top] if score > 0])
    return out


def topic_clusters(embeddings: np.ndarray, texts: Sequence[str], k: int | None = None, *, seed: int = 0,
                   top_words: int = 5) -> dict:
    """Cluster ``embeddings`` (unit rows, one per text) and describe the clusters, largest first:
    ``{"k", "rows", "effective_clusters", "clusters": [{"rows", "share", "top_words"}, ...]}``."""
    n = len(texts)
    k = min(k or default_clusters(n), n)
    labels, _ = kmeans(embeddings, k, seed=seed)
    sizes = np.bincount(labels, minlength=k)
    top = distinctive_words(texts, labels, k, top=top_words)
    order = sorted(range(k), key=lambda c: (-sizes[c], c))
    return {"k": k, "rows": n, "effective_clusters": effective_clusters(sizes.tolist()),
            "clusters": [{"rows": int(sizes[c]), "share": float(sizes[c] / n), "top_words": top[c]} for c in order]}
