"""The demo task: turn a one-sentence description of a person into a JSON record with fixed keys.

    "Maria Lopez is a 34-year-old nurse who lives in Madrid."
    -> {"name": "Maria Lopez", "age": 34, "job": "nurse", "city": "Madrid"}

Rows use the conventional ``messages`` format (system, user, assistant), so every stage can train on
them. The sentences come from 13 templates with different word orders. The ``test`` split draws first
names, last names and cities from pools disjoint from ``train``/``valid``, so its score measures
extraction, not memorised names (jobs are shared: the record copies the job word, it need not learn it).
Sentences are short (<= 20 words); with the chat template a prompt plus answer is about 60-90 tokens.
"""

from __future__ import annotations

import json
import random
import re
from statistics import fmean

from posttrain.errors import PosttrainError
from posttrain.generation import SamplingConfig, generate

SYSTEM = "You are a data extraction assistant."
INSTRUCTION = "Extract name, age, job and city as JSON."
KEYS = ("name", "age", "job", "city")
SPLITS = ("train", "valid", "test")

# Pools seen in training (train and valid) ...
SEEN_FIRST = (
    "Maria James Aisha Kenji Olga Pedro Fatima Lukas Priya Daniel Sofia Omar Elena Noah Chloe Ivan Mei Samuel "
    "Zara Tomas Hannah Ahmed Laura Diego Nina Victor Amara Felix Rosa Yusuf Clara Mateo Leila Oscar Ingrid "
    "Ravi Julia Marco Sara Kwame"
).split()
SEEN_LAST = (
    "Lopez Smith Khan Tanaka Petrova Silva Haddad Becker Sharma Kim Rossi Farouk Novak Brown Dubois Ivanov "
    "Chen Okafor Malik Horvat Schmidt Ali Garcia Moreno Weber Costa Mensah Jensen Romero Yilmaz Fischer "
    "Herrera Nasser Larsen Patel Wright Bianchi Nguyen Santos Owusu"
).split()
SEEN_CITIES = (
    "Madrid", "London", "Tokyo", "Berlin", "Lisbon", "Cairo", "Toronto", "Mumbai", "Seoul", "Rome", "Paris",
    "Chicago", "Sydney", "Nairobi", "Dublin", "Vienna", "Warsaw", "Boston", "Lagos", "Oslo", "Prague",
    "Denver", "Manila", "Lima", "Athens", "Zurich", "Istanbul", "Hamburg", "New York", "Buenos Aires",
)
# ... and held out for the test split.
TEST_FIRST = (
    "Beatriz Hiroshi Nadia Emeka Astrid Rafael Svetlana Tariq Greta Joaquin Anouk Dmitri Yara Callum Ines "
    "Bongani Freya Arjun Lucia Stefan"
).split()
TEST_LAST = (
    "Almeida Sato Benali Eze Lindqvist Cardenas Volkova Qureshi Hofmann Navarro Visser Sokolov Mansour "
    "Fraser Ortega Dlamini Nilsson Reddy Ferrari Kowalski"
).split()
TEST_CITIES = (
    "Valencia", "Kyoto", "Munich", "Porto", "Accra", "Vancouver", "Chennai", "Busan", "Naples", "Lyon",
    "Melbourne", "Krakow", "Bergen", "Bogota", "Austin", "Cape Town",
)
JOBS = (
    "nurse", "teacher", "architect", "engineer", "electrician", "baker", "pilot", "lawyer", "accountant",
    "chef", "dentist", "photographer", "plumber", "librarian", "journalist", "pharmacist", "carpenter",
    "designer", "farmer", "mechanic", "bus driver", "data analyst", "veterinarian", "firefighter",
)
# 21-69 keeps "a {age}-year-old" grammatical (no "an 18-", "an 80-").
MIN_AGE, MAX_AGE = 21, 69

# {a_job} is the job with its article ("an architect").
TEMPLATES = (
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "In {city}, {age}-year-old {job} {name} starts work early every day.",
    "{name} ({age}) works as {a_job} in {city}.",
    "Meet {name}, {a_job} from {city}, aged {age}.",
    "{name}, {age}, is {a_job} based in {city}.",
    "At {age}, {name} works as {a_job} in {city}.",
    "{a_job} living in {city}, {name} is {age} years old.",
    "{name} lives in {city}, works as {a_job}, and is {age} years old.",
    "{city} is home to {name}, a {age}-year-old {job}.",
    "The {job} {name}, aged {age}, moved to {city} last year.",
    "{name} has worked as {a_job} in {city} for years and is now {age}.",
    "Born {age} years ago, {name} now works as {a_job} in {city}.",
    "Our new neighbour in {city} is {name}, {a_job} who just turned {age}.",
)


def _pools(split: str) -> tuple[list[str], list[str], tuple[str, ...]]:
    if split in ("train", "valid"):
        return SEEN_FIRST, SEEN_LAST, SEEN_CITIES
    if split == "test":
        return TEST_FIRST, TEST_LAST, TEST_CITIES
    raise PosttrainError(f"json_task split must be one of {', '.join(SPLITS)}, got '{split}'")


def make_row(record: dict, template: str) -> dict:
    """One ``messages`` row: the sentence the template writes for ``record``, answered with its JSON."""
    job = record["job"]
    a_job = ("an " if job[0] in "aeiou" else "a ") + job
    sentence = template.format(a_job=a_job, **record)
    sentence = sentence[0].upper() + sentence[1:]
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{INSTRUCTION}\n\n{sentence}"},
            {"role": "assistant", "content": json.dumps({key: record[key] for key in KEYS})},
        ]
    }


def make_rows(n: int, split: str, seed: int) -> list[dict]:
    """``n`` rows of ``split`` (train, valid or test); the same arguments always give the same rows."""
    first_names, last_names, cities = _pools(split)
    rng = random.Random(f"json_task/{split}/{seed}")  # str seeds are hashed stably, unlike hash()
    rows = []
    for _ in range(n):
        record = {
            "name": f"{rng.choice(first_names)} {rng.choice(last_names)}",
            "age": rng.randint(MIN_AGE, MAX_AGE),
            "job": rng.choice(JOBS),
            "city": rng.choice(cities),
        }
        rows.append(make_row(record, rng.choice(TEMPLATES)))
    return rows


def sentence_of(row: dict) -> str:
    """The sentence in a row's user message."""
    return row["messages"][1]["content"].removeprefix(INSTRUCTION).strip()


def reference_of(row: dict) -> dict:
    """The reference record, from the row's assistant message."""
    return json.loads(row["messages"][-1]["content"])


_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def parse_record(completion: str) -> dict | None:
    """The JSON object in a completion (bare, or inside one ```json fence), or None if there is none."""
    text = completion.strip()
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _leading_record(completion: str) -> dict | None:
    """The first JSON object in a completion, ignoring any text around it (for the lenient score)."""
    start = completion.find("{")
    if start < 0:
        return None
    try:
        parsed, _ = json.JSONDecoder().raw_decode(completion, start)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _same(value: object, expected: object) -> bool:
    # Types must match too: "34" is not 34, and True is not 1.
    return type(value) is type(expected) and value == expected


def _roughly_same(value: object, expected: object) -> bool:
    if isinstance(value, str) and isinstance(expected, str):
        return value.strip().casefold() == expected.casefold()
    return _same(value, expected)


def score(completion: str, row: dict) -> dict:
    """Score one completion against the row's reference record.

    ``valid_json``: the whole completion is a JSON object; ``exact``: it has exactly the reference keys
    and values (any key order); ``field_accuracy``: the fraction of the 4 fields with the right value and
    type. ``lenient_field_accuracy`` is a diagnostic that separates content from format: it reads the
    first JSON object anywhere in the completion (so chatter after it is ignored) and compares strings
    case-insensitively.
    """
    reference = reference_of(row)
    record = parse_record(completion)
    leading = record if record is not None else _leading_record(completion)
    lenient = [leading is not None and key in leading and _roughly_same(leading[key], reference[key]) for key in KEYS]
    scores = {"lenient_field_accuracy": sum(lenient) / len(KEYS)}
    if record is None:
        return {"exact": False, "valid_json": False, "field_accuracy": 0.0, **scores}
    right = [key in record and _same(record[key], reference[key]) for key in KEYS]
    return {
        "exact": all(right) and record.keys() == reference.keys(),
        "valid_json": True,
        "field_accuracy": sum(right) / len(KEYS),
        **scores,
    }


def evaluate(
    model, tokenizer, rows: list[dict], batch_size: int = 16, max_new_tokens: int = 48, num_samples: int = 8
) -> dict:
    """Greedy-decode every row's prompt and score it.

    Returns ``exact_match``, ``valid_json``, ``field_accuracy`` and ``lenient_field_accuracy`` (means
    over rows, see :func:`score`), ``n``, and ``samples``: the first ``num_samples`` (sentence,
    completion) pairs.
    """
    if not rows:
        raise PosttrainError("json_task.evaluate needs at least one row")
    prompts = [row["messages"][:-1] for row in rows]
    completions = generate(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new_tokens), batch_size=batch_size
    )
    scores = [score(completion, row) for completion, row in zip(completions, rows, strict=True)]
    return {
        "exact_match": fmean(s["exact"] for s in scores),
        "valid_json": fmean(s["valid_json"] for s in scores),
        "field_accuracy": fmean(s["field_accuracy"] for s in scores),
        "lenient_field_accuracy": fmean(s["lenient_field_accuracy"] for s in scores),
        "n": len(rows),
        "samples": [(sentence_of(row), c) for row, c in zip(rows[:num_samples], completions, strict=False)],
    }


def prompt_row(row: dict) -> dict:
    """A held-out prompt row for the recipes' task evaluation: the conversation without its answer, plus the
    reference ``record`` that :func:`field_reward` compares against."""
    return {"prompt": row["messages"][:-1], "record": reference_of(row)}


def field_reward(prompt, completion: str, record: dict, **row) -> float:
    """Reward-function form of :func:`score`'s ``field_accuracy``: the share of the 4 fields the completion's
    JSON object gets right (value and type); 0 when the completion is not a JSON object."""
    parsed = parse_record(completion)
    if parsed is None:
        return 0.0
    return sum(key in parsed and _same(parsed[key], record[key]) for key in KEYS) / len(KEYS)
