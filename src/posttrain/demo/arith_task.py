"""A built-in verifiable RL task: one-step arithmetic word problems, checked by code.

"Tom has 15 coins and gives away 4. How many coins does Tom have left?" -> 11. The reward is the shipped
``numeric_match`` verifier (the last number in the completion equals the answer), so correct reasoning that runs
past ``max_new_tokens`` before stating the result earns nothing: the policy is pushed to state the arithmetic
and the result promptly. Test problems use names and objects that never appear in training, and their number
pairs are disjoint from the training ones.
"""

from __future__ import annotations

import random

TRAIN_NAMES = ("Tom", "Ann", "Sam", "Lily", "Max", "Mia", "Leo", "Zoe", "Ben", "Eva")
TRAIN_ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles")
TEST_NAMES = ("Omar", "Ines", "Raj", "Yuki")
TEST_ITEMS = ("kites", "cups", "rocks", "plums")
SUFFIX = " Reply with just the number."


def _pairs(split: str) -> list[tuple[int, int]]:
    """(a, b) pairs with 2 <= b <= a <= 20, split by a hash so train and test never share a pair."""
    pairs = [(a, b) for a in range(2, 21) for b in range(2, a + 1)]
    return [(a, b) for a, b in pairs if ((a * 31 + b * 17) % 5 == 0) == (split == "test")]


def make_rows(n: int, split: str, seed: int) -> list[dict]:
    """``n`` prompt rows ``{"prompt": [user message], "answer": "11"}`` of ``split`` ("train" or "test")."""
    rng = random.Random(f"{seed}-{split}")
    names, items = (TEST_NAMES, TEST_ITEMS) if split == "test" else (TRAIN_NAMES, TRAIN_ITEMS)
    pairs = _pairs(split)
    rows = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        who, what = rng.choice(names), rng.choice(items)
        if rng.random() < 0.5:
            question, answer = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?", a + b
        else:
            question, answer = f"{who} has {a} {what} and gives away {b}. How many {what} does {who} have left?", a - b
        rows.append({"prompt": [{"role": "user", "content": question + SUFFIX}], "answer": str(answer)})
    return rows
