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


HINTS = ("I think the answer is {x}.", "My friend says it's {x}.", "I'm pretty sure it's {x}, right?")


def make_rows(n: int, split: str, seed: int, wrong_hint_share: float = 0.0) -> list[dict]:
    """``n`` prompt rows ``{"prompt": [user message], "answer": "11"}`` of ``split`` ("train" or "test").

    With ``wrong_hint_share`` > 0, that share of the problems also carries the user's wrong answer ("I think the
    answer is 9."), rewarded like any other on the true answer: RL on plain problems made the adaptive recipe's
    policy repeat answers users asserted (its sycophancy gate failed, 0.24 -> 0.52), and these prompts reward
    ignoring them."""
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
        if wrong_hint_share > 0 and rng.random() < wrong_hint_share:
            wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3])
            question += " " + rng.choice(HINTS).format(x=max(wrong, 0) if wrong != 0 else answer + 1)
        rows.append({"prompt": [{"role": "user", "content": question + SUFFIX}], "answer": str(answer)})
    return rows
