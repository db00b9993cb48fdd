"""The demo's concise-answers preference task: rows, disjoint splits, and the automated check (no model)."""

from __future__ import annotations

import json

import pytest

from posttrain.demo import concise_task
from posttrain.demo.concise_task import MAX_WORDS, check, make_pairs, states_fact, word_count
from posttrain.errors import PosttrainError

SPLITS = ("train", "valid", "test")


def fact_key(row: dict) -> tuple:
    """What a row asks about, independent of wording: the country, or the unordered addends."""
    answer = row["answer"]
    if answer["kind"] == "capital":
        return ("capital", answer["country"])
    return ("sum", *sorted((answer["a"], answer["b"])))


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    # Enough rows to draw every fact of every split several times, in every wording.
    return {split: make_pairs(600, split, seed=0) for split in SPLITS}


def test_rows_are_conversational_preference_pairs(rows):
    from posttrain.data.preference import normalize_pair

    for row in rows["train"][:50]:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
        assert [m["role"] for m in row["rejected"]] == ["assistant"]
        assert row["prompt"][0]["content"].endswith("?")
        json.dumps(row)  # JSONL-serialisable
        chosen, rejected = normalize_pair(row)  # what `posttrain dpo` / `posttrain rm` accept
        assert chosen.kind == rejected.kind == "chat"


def test_deterministic_and_seeded():
    assert make_pairs(40, "train", seed=3) == make_pairs(40, "train", seed=3)
    assert make_pairs(40, "train", seed=3) != make_pairs(40, "train", seed=4)
    # A prefix of a longer draw is the shorter draw.
    assert make_pairs(60, "test", seed=1)[:20] == make_pairs(20, "test", seed=1)


def test_kinds_take_turns_and_small_splits_repeat_no_question():
    rows = make_pairs(30, "test", seed=1)
    assert [r["answer"]["kind"] for r in rows[:6]] == ["capital", "sum"] * 3
    keys = [fact_key(r) for r in rows]
    assert len(set(keys)) == len(keys)


def test_splits_use_disjoint_facts(rows):
    keys = {split: {fact_key(r) for r in rows[split]} for split in SPLITS}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["valid"]
    assert not keys["valid"] & keys["test"]
    # Disjoint at the source too: no country or addend pair belongs to two splits, and every fact is in one.
    for pools, facts in ((concise_task.CAPITAL_SPLITS, concise_task.CAPITALS), (concise_task.SUM_SPLITS, concise_task.SUM_PAIRS)):
        assert sorted(f for split in SPLITS for f in pools[split]) == sorted(facts)
        assert len(set(facts)) == len(facts)
    # Every fact of each split is drawn (600 rows is enough), and the capitals differ too.
    for split in SPLITS:
        assert len(keys[split]) == sum(len(v) for v in concise_task._facts(split).values())
    capitals = {split: {r["answer"]["value"] for r in rows[split] if r["answer"]["kind"] == "capital"} for split in SPLITS}
    assert not capitals["train"] & capitals["test"]


def test_check_passes_every_chosen_and_fails_every_rejected(rows):
    for split in SPLITS:
        for row in rows[split]:
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert check(chosen, row), (split, chosen)
            assert not check(rejected, row), (split, rejected)
            # The rejected answer holds the same correct fact: it loses on length alone.
            assert states_fact(rejected, row), (split, rejected)
            assert word_count(rejected) > MAX_WORDS + 15
            assert word_count(chosen) <= MAX_WORDS - 3


def test_check_capital():
    row = concise_task.make_row({"kind": "capital", "country": "Colombia", "value": "Bogota", "accept": ["Bogota", "Bogotá"]},
                                concise_task.random.Random(0))
    assert check("Bogotá.", row) and check("The capital of Colombia is BOGOTA.", row)
    assert not check("Medellín.", row)
    assert not check("Bogotanian.", row)  # whole words only
    assert not check("The capital of Colombia is Bogota, a city of museums, parks, restaurants and lots of traffic.", row)


def test_check_sum():
    row = concise_task.make_row({"kind": "sum", "a": 5, "b": 7, "value": "12", "accept": ["12", "twelve"]},
                                concise_task.random.Random(0))
    for good in ("12", "12.", "5 + 7 = 12.", "The answer is twelve.", "5 plus 7 equals 12."):
        assert check(good, row), good
    for bad in ("13.", "5 + 7 = 13.", "It is 12, or maybe 13.", "112.", "twelve-ish 11", ""):
        assert not check(bad, row), bad


def test_number_words():
    assert concise_task.number_word(7) == "seven"
    assert concise_task.number_word(20) == "twenty"
    assert concise_task.number_word(24) == "twenty-four"
    with pytest.raises(ValueError):
        concise_task.number_word(100)


def test_unknown_split():
    with pytest.raises(PosttrainError, match="split"):
        make_pairs(3, "dev", seed=0)


def test_sums_never_equal_an_addend_and_come_in_both_orders():
    for split in SPLITS:
        for a, b in concise_task.SUM_SPLITS[split]:
            assert a <= b and a + b not in (a, b)
    asked = {(r["answer"]["a"], r["answer"]["b"]) for r in make_pairs(300, "train", seed=0) if r["answer"]["kind"] == "sum"}
    assert any((b, a) in asked for a, b in asked if a != b)
