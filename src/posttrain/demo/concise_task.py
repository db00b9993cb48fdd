"""The demo's preference task: answer short factual questions concisely.

    prompt:   "What is the capital of Portugal?"
    chosen:   "The capital of Portugal is Lisbon."
    rejected: "Great question! I'm happy to help you with that. The capital of Portugal is Lisbon. Capital
               cities are usually where ... I hope this helps! Let me know if you have any other questions."

Both answers hold the same correct fact, so the pairs teach a style (say it in one short sentence), not
knowledge. Questions come in two kinds, taking turns, whose answers this module fixes: the capital of a
country, and the sum of two small numbers. Rows use TRL's conversational prompt/chosen/rejected format
(plus an ``answer`` column, ignored by training, that :func:`check` reads).

The splits use disjoint facts: ``train``, ``valid`` and ``test`` never share a country or a pair of addends,
so a test score measures the style carried over to questions never seen in training.

:func:`check` is the automated judge: an answer passes when it states the correct fact and is concise (at
most :data:`MAX_WORDS` words). Every ``chosen`` passes and every ``rejected`` fails (the tests check all
rows). The base SmolLM2-135M-Instruct mostly fails: it explains sums at length (and answers most capitals
in one sentence, which passes).

The check also needs the right fact, and a 135M model knows few. So that it measures style rather than
knowledge, the pools hold only facts the base model completes correctly when made to answer tersely (greedy,
after the forced prefix "The capital of X is" or "a + b ="; for a sum, in both orders). That probe was run
once on every candidate and applied alike to all splits; countries such as Turkey, Vietnam, Brazil or
Switzerland and sums such as 9 + 5 or 7 + 7 were left out because the model gets them wrong.
"""

from __future__ import annotations

import random
import re
import unicodedata
from statistics import fmean

from posttrain.errors import PosttrainError

SPLITS = ("train", "valid", "test")
MAX_WORDS = 12
"""An answer of more words than this is not concise (the longest ``chosen`` has 9, every ``rejected`` > 30)."""

# (country, capital, other accepted spellings of the capital).
CAPITALS = (
    ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Ireland", "Dublin"),
    ("Norway", "Oslo"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("South Korea", "Seoul"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Iran", "Tehran"), ("Indonesia", "Jakarta"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Nepal", "Kathmandu"), ("New Zealand", "Wellington"),
    ("Colombia", "Bogota", "Bogotá"), ("Croatia", "Zagreb"), ("Finland", "Helsinki"), ("Sweden", "Stockholm"),
    ("Austria", "Vienna"), ("the Netherlands", "Amsterdam"), ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"),
    ("the Philippines", "Manila"), ("Iraq", "Baghdad"), ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("the United Kingdom", "London"), ("China", "Beijing"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Mexico", "Mexico City"), ("India", "New Delhi", "Delhi"), ("the Czech Republic", "Prague"), ("Chile", "Santiago"),
    ("Cambodia", "Phnom Penh"), ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Qatar", "Doha"),
    ("Afghanistan", "Kabul"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"), ("Senegal", "Dakar"), ("Tunisia", "Tunis"),
    ("Libya", "Tripoli"), ("Sudan", "Khartoum"), ("Uruguay", "Montevideo"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Estonia", "Tallinn"), ("North Korea", "Pyongyang"), ("Cyprus", "Nicosia"),
    ("Albania", "Tirana"), ("Zambia", "Lusaka"), ("Ethiopia", "Addis Ababa"), ("Bangladesh", "Dhaka"),
)
# Unordered addends (a <= b); a row asks "a + b" or "b + a". A sum never equals an addend, so stating it is
# unambiguous.
SUM_PAIRS = (
    (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 2), (2, 3), (2, 4), (2, 8), (2, 9), (3, 3),
    (3, 4), (3, 5), (3, 6), (3, 7), (3, 8), (4, 4), (4, 5), (4, 6), (4, 7), (4, 8), (4, 9), (4, 10), (4, 11),
    (4, 12), (5, 6), (5, 7), (6, 6), (6, 7), (6, 8), (6, 9), (7, 8), (7, 9), (8, 9), (10, 10), (10, 12), (11, 11),
    (12, 12),
)
# How many facts of each kind the valid and test splits get; train gets the rest.
SPLIT_SIZES = {"capital": {"test": 20, "valid": 9}, "sum": {"test": 16, "valid": 5}}


def _split(kind: str, facts: tuple) -> dict[str, tuple]:
    """The facts shuffled once with a fixed seed, then cut into test, valid and train (disjoint by construction)."""
    shuffled = list(facts)
    random.Random(f"concise_task/{kind}").shuffle(shuffled)  # str seeds are hashed stably, unlike hash()
    n_test, n_valid = SPLIT_SIZES[kind]["test"], SPLIT_SIZES[kind]["valid"]
    cut = {"test": shuffled[:n_test], "valid": shuffled[n_test:n_test + n_valid], "train": shuffled[n_test + n_valid:]}
    return {split: tuple(sorted(cut[split])) for split in SPLITS}


CAPITAL_SPLITS = _split("capital", CAPITALS)
SUM_SPLITS = _split("sum", SUM_PAIRS)

KINDS = ("capital", "sum")
QUESTIONS = {
    "capital": ("What is the capital of {country}?", "Which city is the capital of {country}?",
                "What's the capital city of {country}?"),
    "sum": ("What is {a} + {b}?", "What is {a} plus {b}?", "How much is {a} plus {b}?"),
}
# One concise form per kind: the forms the knowledge probe above used, so a model that learns the style also
# reaches for what it knows.
CONCISE = {
    "capital": ("The capital of {country} is {capital}.",),
    "sum": ("{a} + {b} = {value}.",),
}
# The sentence the rambling answer buries the fact in.
FACT_SENTENCE = {
    "capital": "The capital of {country} is {capital}.",
    "sum": "When you add {a} and {b} together, the result is {value}.",
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
                    for c, cap, *alt in CAPITAL_SPLITS[split]],
        "sum": [{"kind": "sum", "a": a, "b": b, "value": str(a + b), "accept": [str(a + b), number_word(a + b)]}
                for a, b in SUM_SPLITS[split]],
    }


def _fields(answer: dict) -> dict:
    if answer["kind"] == "capital":
        return {"country": answer["country"], "capital": answer["value"]}
    return {"a": answer["a"], "b": answer["b"], "value": answer["value"]}


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

    Kinds take turns (capital, sum, capital, ...). Within a kind, facts are drawn without replacement until
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
    length), ``concise`` (<= MAX_WORDS words, right or wrong), ``mean_words``, ``n``, ``completions`` and
    ``passed`` (all of them, in row order) and ``samples``: the first ``num_samples`` (question, completion, passed) triples.
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
        "passed": passed,
        "samples": [(question_of(row), c, p) for row, c, p in zip(rows[:num_samples], completions, passed, strict=False)],
    }


def concise_reward(prompt, completion: str, answer, **row) -> float:
    """The check as a reward function (``posttrain.demo.concise_task:concise_reward``): 1.0 if it passes, else 0.0."""
    return float(check(completion, {"answer": answer}))
