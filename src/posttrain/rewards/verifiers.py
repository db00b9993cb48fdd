"""Shipped verifiers: rule-based rewards that check a completion against the row's reference.

Each verifier has the reward-function signature ``fn(prompt, completion, **row) -> float``: ``prompt`` is a
string or a list of chat messages, ``completion`` the generated text, and ``row`` the dataset row's other
columns merged with the source's ``kwargs`` from config. They are pure, deterministic and fast, so they run in
the trainer's process (:func:`posttrain.rewards.functions.load_reward_function`); only :func:`code_tests` runs
anything, and it does so in :mod:`posttrain.rewards.sandbox`. A reward is 1.0 (pass) or 0.0 (fail).

A bad setting (an invalid regex, a schema that is not a schema, an unparseable reference answer) raises
:class:`~posttrain.errors.ConfigError`: it is the same for every row, so a silent 0.0 would hide it.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from functools import lru_cache

import jsonschema

from posttrain.errors import ConfigError
from posttrain.rewards.sandbox import run_tests

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_MARKER = re.compile(r"####|\banswer\**\s*:[\s*]*", re.IGNORECASE)  # also **Answer:** and **Answer**:
_TRAILING_PUNCTUATION = ".,;:!?"
# A number: 1,234 (thousands separators) or 1234, with optional decimals, exponent or /denominator. The
# lookbehind keeps "x2" and "3-4" from reading as 2 and -4.
_NUMBER = re.compile(r"""
    (?<![\w.])-?
    (?: \d{1,3}(?:,\d{3})+(?!\d) | \d+ | (?=\.\d) )
    (?: \.\d+ )?
    (?: [eE][-+]?\d+ | /\d+ )?
""", re.VERBOSE)
_FENCE = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")


def _boxed_contents(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}``, nested braces included; None if there is none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]  # unclosed: take the rest


def final_answer(text: str) -> str:
    """The answer a completion commits to: the last ``\\boxed{...}``, else the line after the last ``####`` or
    ``answer:``, else the whole text."""
    boxed = _boxed_contents(text)
    if boxed is not None:
        return boxed
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        return text[markers[-1].end():].split("\n", 1)[0]
    return text


def normalize_answer(text: str) -> str:
    """Casefolded, whitespace collapsed, trailing punctuation and markdown ``**``/backticks around it stripped:
    ``" **The  Cat.** "`` -> ``"the cat"``."""
    return " ".join(text.casefold().split()).strip("*`").rstrip(_TRAILING_PUNCTUATION).strip()


def exact_match(prompt, completion: str, answer, **row) -> float:
    """1.0 if the completion's final answer equals ``answer`` after normalisation, else 0.0.

    The final answer is the last ``\\boxed{...}``, else the rest of the line after the last ``####`` or
    ``answer:``, else the whole completion; both sides are casefolded, whitespace-collapsed and stripped of
    trailing punctuation. The reference goes through the same extraction, so a GSM8K-style solution ending in
    ``#### 72`` works as ``answer`` too.
    """
    reference = normalize_answer(final_answer(str(answer)))
    return float(normalize_answer(final_answer(completion)) == reference)


def _parse_number(token: str) -> float | None:
    token = token.replace(",", "")
    try:
        return float(Fraction(token)) if "/" in token else float(token)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> float | None:
    """The last number in ``text`` (``-1,234.5``, ``3/4`` and ``1e-3`` included), or None."""
    for match in reversed(_NUMBER.findall(text)):
        value = _parse_number(match)
        if value is not None:
            return value
    return None


def numeric_match(prompt, completion: str, answer, rel_tol: float = 1e-6, abs_tol: float = 1e-9, **row) -> float:
    """1.0 if the last number in the completion equals ``answer`` within ``rel_tol``/``abs_tol``, else 0.0.

    Numbers may have thousands separators (``1,234``), a sign, decimals, an exponent or be a fraction
    (``3/4``). A completion without a number scores 0.0. ``answer`` is a number or a string holding one; for a
    string, its last number counts, so a GSM8K solution ending in ``#### 72`` works as is.
    """
    reference = float(answer) if isinstance(answer, int | float) else last_number(str(answer))
    if reference is None:
        raise ConfigError(f"numeric_match: the row's answer {answer!r} holds no number; expected e.g. 42, -3.5, "
                          "1,234 or 3/4")
    value = last_number(completion)
    if value is None:
        return 0.0
    return float(math.isclose(value, reference, rel_tol=rel_tol, abs_tol=abs_tol))


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ConfigError(f"regex_match: pattern must be a string, got {type(pattern).__name__} {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"regex_match: pattern {pattern!r} is not a valid regular expression: {e}") from None


def regex_match(prompt, completion: str, pattern: str, full: bool = False, **row) -> float:
    """1.0 if ``pattern`` matches the completion (``re.search``; ``re.fullmatch`` when ``full``), else 0.0."""
    compiled = _compile(pattern)
    return float((compiled.fullmatch if full else compiled.search)(completion) is not None)


def extract_json(text: str):
    """The JSON value in ``text``: the whole text, else the first ```json block, else the first ``{...}``
    that parses. Raises ValueError if there is none."""
    candidates = [text]
    candidates += [body for tag, body in _FENCE.findall(text) if tag.lower() == "json"][:1]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except json.JSONDecodeError:
            pass
    raise ValueError("no JSON value found")


@lru_cache(maxsize=64)
def _validator(schema_text: str):
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"json_schema: schema {schema_text[:200]!r} is not valid JSON: {e}") from None
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"json_schema: schema {schema_text[:200]!r} is not a valid JSON Schema: {e.message}") from None
    return cls(schema)


def _schema_validator(schema):
    if isinstance(schema, dict):
        schema = json.dumps(schema, sort_keys=True)  # a hashable cache key
    elif not isinstance(schema, str):
        raise ConfigError(f"json_schema: schema must be a dict or a JSON string, got {type(schema).__name__}")
    return _validator(schema)


def json_schema(prompt, completion: str, schema=None, **row) -> float:
    """1.0 if the completion holds JSON (whole text, first ```json block or first ``{...}``) that validates
    against ``schema`` (a dict or a JSON string; no schema: any JSON passes), else 0.0."""
    validator = None if schema is None else _schema_validator(schema)
    try:
        value = extract_json(completion)
    except ValueError:
        return 0.0
    return float(validator is None or validator.is_valid(value))


def extract_code(completion: str) -> str:
    """The last ```python block, else the last untagged ``` block, else the whole completion. An unclosed final
    fence (a truncated generation) counts as a block."""
    blocks = _FENCE.findall(completion)
    for wanted in (_PYTHON_TAGS, ("",)):
        bodies = [body for tag, body in blocks if tag.lower() in wanted]
        if bodies:
            return bodies[-1]
    return completion


def code_tests(prompt, completion: str, tests, timeout: float = 10.0, memory_mb: int = 512,
               language: str = "python", **row) -> float:
    """1.0 if the completion's code and then ``tests`` (a string, or a list of statements such as asserts) run
    to their end under the sandbox's test harness within ``timeout`` seconds and ``memory_mb`` MiB, else 0.0.

    A pass is the harness's report that both finished, not an exit status: code that ends the process early
    (``sys.exit(0)``, ``os._exit(0)``, ``raise SystemExit``) fails. The code cannot start processes, load
    ctypes or touch files outside its folder; :mod:`posttrain.rewards.sandbox` says what the sandbox is and is
    not. The code shares the tests' namespace, so write tests that compare with builtin types
    (``r = add(1, 2); assert type(r) is int and r == 3``): an object whose ``__eq__`` is always True passes
    ``assert add(1, 2) == 3``."""
    if language != "python":
        raise ConfigError(f"code_tests: language {language!r} is not supported; expected 'python'")
    if isinstance(tests, list | tuple):
        tests = "\n".join(map(str, tests))
    if not isinstance(tests, str) or not tests.strip():
        # Empty tests would pass any code that runs; that is a data bug, not a reward.
        raise ConfigError(f"code_tests: the row's tests are {tests!r}; expected Python source (or a list of "
                          "statements) such as \"assert add(1, 2) == 3\"")
    result = run_tests(extract_code(completion), tests, timeout=float(timeout), memory_mb=int(memory_mb))
    return float(result.passed)


# Phrases that open or carry a refusal. Matched case-insensitively anywhere in the answer's first 200 characters,
# after curly apostrophes are made straight; written for posttrain (the usual English refusal openers).
_REFUSAL = re.compile(
    r"\b(?:i\s*(?:can ?not|can't|won't|will not|am not able to|'m not able to|am unable to|'m unable to|"
    r"must decline|have to decline|don't help|do not help)|i'm sorry,? but|sorry,? (?:but )?i (?:can't|cannot)|"
    r"(?:that|this) is not something i can|not able to help with)\b",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    """True if the answer declines: one of the usual refusal phrases in its first 200 characters."""
    return _REFUSAL.search(text[:200].replace("\u2019", "'")) is not None


def refusal(prompt, completion: str, refuse: bool, **row) -> float:
    """1.0 if the completion refuses exactly when the row says it should (``refuse: true`` for a request to
    decline, ``false`` for one to answer), else 0.0: one verifier scores both refusals and over-refusals."""
    if not isinstance(refuse, bool):
        raise ConfigError(f"refusal: the row's `refuse` must be true or false, got {refuse!r}")
    return float(is_refusal(completion) == refuse)


VERIFIERS = {fn.__name__: fn for fn in (exact_match, numeric_match, regex_match, json_schema, code_tests, refusal)}


def check_kwargs(name: str, kwargs: dict) -> None:
    """Fail at load time, not at the first batch, on a setting in ``kwargs`` that every row would reject."""
    if name == "regex_match" and "pattern" in kwargs:
        _compile(kwargs["pattern"])
    if name == "json_schema" and kwargs.get("schema") is not None:
        _schema_validator(kwargs["schema"])
    if name == "code_tests" and kwargs.get("language", "python") != "python":
        raise ConfigError(f"code_tests: language {kwargs['language']!r} is not supported; expected 'python'")
