"""The built-in RL demo task: answers are right, and held-out problems never appear in training."""

import re

from posttrain.demo.arith_task import TEST_ITEMS, TEST_NAMES, TRAIN_ITEMS, TRAIN_NAMES, make_rows
from posttrain.rewards.verifiers import numeric_match


def _parse(row):
    text = row["prompt"][0]["content"]
    who, a, what, rest = re.match(r"(\w+) has (\d+) (\w+) and (.*)", text).groups()
    b = int(re.search(r"(\d+)", rest).group(1))
    return who, int(a), what, b, "more" in rest


def test_answers_are_correct_and_checkable():
    for row in make_rows(200, "train", seed=0) + make_rows(50, "test", seed=0):
        _, a, _, b, adds = _parse(row)
        assert int(row["answer"]) == (a + b if adds else a - b)
        assert numeric_match(row["prompt"], f"{a} and {b} make {row['answer']}.", row["answer"]) == 1.0
        assert numeric_match(row["prompt"], f"{a} and {b} make {int(row['answer']) + 1}.", row["answer"]) == 0.0


def test_held_out_problems_are_disjoint_from_training():
    train = {(_parse(r)[1], _parse(r)[3]) for r in make_rows(500, "train", seed=0)}
    test = make_rows(100, "test", seed=0)
    for row in test:
        who, a, what, b, _ = _parse(row)
        assert (a, b) not in train
        assert who in TEST_NAMES and who not in TRAIN_NAMES
        assert what in TEST_ITEMS and what not in TRAIN_ITEMS
    assert make_rows(10, "test", seed=0) == make_rows(10, "test", seed=0)  # deterministic
