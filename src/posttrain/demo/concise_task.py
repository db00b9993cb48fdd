"""The demo's preference task: answer short factual questions concisely.

    prompt:   "What is the capital of Portugal?"
    chosen:   "The capital of Portugal is Lisbon."
    rejected: "Great question! I'm happy to help with that. The capital of Portugal is Lisbon. Capital
               cities are usually where ... I hope this helps! Let me know if you have any other questions."

Both answers hold the same correct fact, so the pairs teach a style (say it in one short sentence), not
knowledge. Questions come in three kinds whose answers are fixed by this module: the capital of a country,
the sum of two small numbers, and the colour of a familiar thing. Rows use TRL's conversational
prompt/chosen/rejected format (plus an ``answer`` column, ignored by training, that :func:`check` reads).

The splits use disjoint facts: ``train``, ``valid`` and ``test`` never share a country, a pair of numbers
or a thing, so a test score measures the style carried over to questions never seen in training.

:func:`check` is the automated judge: an answer passes when it states the correct fact and is concise
(at most :data:`MAX_WORDS` words). Every ``chosen`` passes and every ``rejected`` fails (the tests check
all rows); the base SmolLM2-135M-Instruct mostly fails, because it explains at length.
"""

from __future__ import annotations

import random
import re
import unicodedata
from statistics import fmean

from posttrain.errors import PosttrainError

SPLITS = ("train", "valid", "test")
MAX_WORDS = 12
"""An answer of more words than this is not concise (the longest ``chosen`` has 9, every ``rejected`` > 20)."""

# (country, capital, other accepted spellings of the capital). The split of each fact is fixed here.
CAPITALS = {
    "train": (
        ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Ireland", "Dublin"),
        ("Norway", "Oslo"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
        ("Belgium", "Brussels"), ("South Korea", "Seoul"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
        ("Cuba", "Havana"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Turkey", "Ankara"),
        ("Iran", "Tehran"), ("Indonesia", "Jakarta"), ("Vietnam", "Hanoi"), ("Romania", "Bucharest"),
        ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Switzerland", "Bern"), ("Iceland", "Reykjavik"),
        ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Saudi Arabia", "Riyadh"),
        ("Pakistan", "Islamabad"), ("Nepal", "Kathmandu"), ("New Zealand", "Wellington"),
        ("Brazil", "Brasilia", "Brasília"), ("Colombia", "Bogota", "Bogotá"), ("Venezuela", "Caracas"),
        ("Croatia", "Zagreb"), ("Finland", "Helsinki"),
    ),
    "valid": (
        ("Sweden", "Stockholm"), ("Austria", "Vienna"), ("Netherlands", "Amsterdam"), ("Thailand", "Bangkok"),
        ("Argentina", "Buenos Aires"), ("Philippines", "Manila"), ("Iraq", "Baghdad"), ("Ukraine", "Kyiv", "Kiev"),
    ),
    "test": (
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("the United Kingdom", "London"),
        ("China", "Beijing"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Mexico", "Mexico City"),
        ("India", "New Delhi", "Delhi"), ("the Czech Republic", "Prague"), ("Chile", "Santiago"),
        ("Malaysia", "Kuala Lumpur"),
    ),
}

# (thing, colour, other accepted colour words): the thing as it reads after "What colour is".
COLOURS = {
    "train": (
        ("fresh grass", "green"), ("snow", "white"), ("coal", "black"), ("a carrot", "orange"),
        ("a lemon", "yellow"), ("chocolate", "brown"), ("a pumpkin", "orange"), ("a crow", "black"),
        ("blood", "red"), ("a fire truck", "red"), ("an emerald", "green"), ("a sapphire", "blue"),
        ("a flamingo", "pink"), ("an eggplant", "purple"), ("a raven", "black"), ("a cucumber", "green"),
        ("a blueberry", "blue"), ("a dandelion flower", "yellow"), ("an elephant", "grey", "gray"),
        ("a tangerine", "orange"), ("a pearl", "white"), ("a canary", "yellow"), ("a plum", "purple"),
    ),
    "valid": (
        ("a ripe strawberry", "red"), ("a frog", "green"), ("a polar bear", "white"), ("a chestnut", "brown"),
        ("charcoal", "black"), ("a lime", "green"),
    ),
    "test": (
        ("a ripe banana", "yellow"), ("a clear daytime sky", "blue"), ("milk", "white"), ("a ripe tomato", "red"),
        ("a stop sign", "red"), ("the leaves of a tree in summer", "green"), ("a cherry", "red"),
        ("an orange", "orange"), ("a lavender flower", "purple"), ("a gorilla", "black"),
    ),
}

SUM_MIN, SUM_MAX = 2, 12  # both addends; a sum never equals an addend, so stating it is unambiguous


def _split_sums() -> dict[str, tuple[tuple[int, int], ...]]:
    """Every unordered pair of addends (a <= b; a row asks "a + b" or "b + a"), shuffled once with a fixed seed:
    a third of them for test, an eighth for valid, the rest for train."""
    pairs = [(a, b) for a in range(SUM_MIN, SUM_MAX + 1) for b in range(a, SUM_MAX + 1)]
    random.Random("concise_task/sums").shuffle(pairs)
    n_test, n_valid = len(pairs) // 3, len(pairs) // 8
    cut = {"test": pairs[:n_test], "valid": pairs[n_test:n_test + n_valid], "train": pairs[n_test + n_valid:]}
    return {split: tuple(sorted(cut[split])) for split in SPLITS}


SUMS = _split_sums()

KINDS = ("capital", "sum", "colour")
QUESTIONS = {
    "capital": ("What is the capital of {country}?", "Which city is the capital of {country}?",
                "What's the capital city of {country}?"),
    "sum": ("What is {a} + {b}?", "What is {a} plus {b}?", "How much is {a} plus {b}?"),
    "colour": ("What colour is {thing}?", "What color is {thing}?", "Which colour is {thing}?"),
}
CONCISE = {
    "capital": ("{capital}.", "The capital of {country} is {capital}.", "It is {capital}."),
    "sum": ("{value}.", "{a} + {b} = {value}.", "The answer is {value}."),
    "colour": ("{Colour}.", "{Thing} is {colour}.", "It is {colour}."),
}
# The sentence the rambling answer buries the fact in.
FACT_SENTENCE = {
    "capital": "The capital of {country} is {capital}.",
    "sum": "When you add {a} and {b} together, the result is {value}.",
    "colour": "{Thing} is usually {colour}.",
}
OPENERS = (
    "Great question! I'm happy to help you with that.",
    "What a wonderful thing to be curious about! Let me explain.",
    "Thanks for asking, this is something that many people wonder about.",
    "Sure! Let me walk you through this step by step so that it is completely clear.",
    "That's a really interesting question, and I'd be glad to answer it for you.",
)
ELABORATIONS = {
    "capital": (
        "Capital cities are usually where the national government meets, so they play an important role.",
        "Knowing the capital is a useful part of learning about the geography of any country.",
    ),
    "sum": (
        "Addition is one of the basic operations of arithmetic, and it is something we use every day.",
        "You can check this by counting up one step at a time from the first number.",
    ),
    "colour": (
        "Colours come from the way a surface reflects some wavelengths of light and absorbs the others.",
        "This is something you can easily see for yourself the next time you come across one.",
    ),
}
CLOSERS = (
    "I hope this helps! Let me know if you have any other questions.",
    "Feel free to ask if you would like to know more about this topic!",
    "Is there anything else I can help you with today?",
    "Please don't hesitate to reach out if you have more questions.",
)


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def _facts(split: str) -> dict[str, list[dict]]:
    """Every fact of ``split``, by kind, as the ``answer`` dict a row carries."""
    if split not in SPLITS:
        raise PosttrainError(f"concise_task split must be one of {', '.join(SPLITS)}, got '{split}'")
    return {
        "capital": [{"kind": "capital", "country": c, "value": cap, "accept": [cap, *alt]}
                    for c, cap, *alt in CAPITALS[split]],
        "sum": [{"kind": "sum", "a": a, "b": b, "value": str(a + b), "accept": [str(a + b), number_word(a + b)]}
                for a, b in SUMS[split]],
        "colour": [{"kind": "colour", "thing": t, "value": col, "accept": [col, *alt]} for t, col, *alt in COLOURS[split]],
    }


def _fields(answer: dict) -> dict:
    kind = answer["kind"]
    if kind == "capital":
        return {"country": answer["country"], "capital": answer["value"]}
    if kind == "sum":
        return {"a": answer["a"], "b": answer["b"], "value": answer["value"]}
    return {"thing": answer["thing"], "Thing": _capitalize(answer["thing"]), "colour": answer["value"],
            "Colour": _capitalize(answer["value"])}


def make_row(answer: dict, rng: random.Random) -> dict:
    """One preference row for a fact (an ``answer`` dict from :func:`_facts`), its wording drawn from ``rng``."""
    if answer["kind"] == "sum" and rng.random() < 0.5:
        answer = {**answer, "a": answer["b"], "b": answer["a"]}
    kind, fields = answer["kind"], _fields(answer)
    question = _capitalize(rng.choice(QUESTIONS[kind]).format(**fields))
    concise = rng.choice(CONCISE[kind]).format(**fields)
    rambling = " ".join((rng.choice(OPENERS), FACT_SENTENCE[kind].format(**fields),
                         rng.choice(ELABORATIONS[kind]), rng.choice(CLOSERS)))
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": concise}],
        "rejected": [{"role": "assistant", "content": rambling}],
        "answer": answer,
    }


def make_pairs(n: int, split: str, seed: int) -> list[dict]:
    """``n`` preference rows of ``split`` (train, valid or test); the same arguments always give the same rows.

    Kinds take turns (capital, sum, colour, ...). Within a kind, facts are drawn without replacement until
    the split's pool is used up, then reshuffled, so a small split repeats no question.
    """
    facts = _facts(split)
    rng = random.Random(f"concise_task/{split}/{seed}")  # str seeds are hashed stably, unlike hash()
    queues: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    rows = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if not queues[kind]:
            queues[kind] = rng.sample(facts[kind], len(facts[kind]))
        rows.append(make_row(queues[kind].pop(), rng))
    return rows


def question_of(row: dict) -> str:
    return row["prompt"][-1]["content"]


# ------------------------------------------------------------------------------------------ the check
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_word(n: int) -> str:
    """English words of 0 <= n < 100 ("twenty-four")."""
    if not 0 <= n < 100:
        raise ValueError(f"number_word: expected 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


def _fold(text: str) -> str:
    """Lower case without accents, so "Bogotá" matches "bogota"."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(_fold(phrase))}(?![\w-])", _fold(text)) is not None


def word_count(text: str) -> int:
    return len(text.split())


def states_fact(completion: str, row: dict) -> bool:
    """The completion states the row's correct answer. For a sum, every number it writes in digits must also be
    an addend or the sum ("5 + 7 = 12" passes, "5 + 7 = 13" and "It is 12, or 13" do not)."""
    answer = row["answer"]
    if not any(_mentions(completion, phrase) for phrase in answer["accept"]):
        return False
    if answer["kind"] == "sum":
        allowed = {answer["a"], answer["b"], int(answer["value"])}
        return all(int(n) in allowed for n in re.findall(r"\d+", completion))
    return True


def check(completion: str, row: dict) -> bool:
    """The automated judge: the completion states the correct fact AND is concise (<= MAX_WORDS words)."""
    return word_count(completion) <= MAX_WORDS and states_fact(completion, row)


def evaluate(model, tokenizer, rows: list[dict], batch_size: int = 16, max_new_tokens: int = 24,
             num_samples: int = 8) -> dict:
    """Greedy-decode every row's prompt and judge it with :func:`check`.

    ``max_new_tokens`` 24 is about 18 words, enough for any concise answer; an answer cut off there had more
    than :data:`MAX_WORDS` words anyway. Returns ``pass_rate``, ``states_fact`` (the correct fact, at any
    length), ``concise`` (<= MAX_WORDS words, right or wrong), ``mean_words``, ``n``, ``completions`` (all of
    them, in row order) and ``samples``: the first ``num_samples`` (question, completion, passed) triples.
    """
    from posttrain.generation import SamplingConfig, generate

    if not rows:
        raise PosttrainError("concise_task.evaluate needs at least one row")
    completions = generate(model, tokenizer, [row["prompt"] for row in rows],
                           SamplingConfig(max_new_tokens=max_new_tokens, temperature=0), batch_size=batch_size)
    passed = [check(c, row) for c, row in zip(completions, rows, strict=True)]
    return {
        "pass_rate": fmean(passed),
        "states_fact": fmean(states_fact(c, row) for c, row in zip(completions, rows, strict=True)),
        "concise": fmean(word_count(c) <= MAX_WORDS for c in completions),
        "mean_words": fmean(word_count(c) for c in completions),
        "n": len(rows),
        "completions": completions,
        "samples": [(question_of(row), c, p) for row, c, p in zip(rows[:num_samples], completions, passed, strict=False)],
    }
