"""Accuracy signals that are cheap to check: the audit's ``accuracy`` section, and three of ``clean``'s filters.

Each check reads the responses training pushes the model toward (:func:`posttrain.curate.consistency.target_turns`:
trained assistant turns, a pair's chosen reply, a desirable unpaired completion). Nothing is executed.

1. **Contradicts the reference** (:func:`reference_problem`): when the row has a ``reference`` column (else
   ``answer``, else ``ground_truth``: the first that is present and not null), the last response is compared with
   it. A numeric reference (a number, or a string that is one, such as ``"1,234"`` or a GSM8K ``"... #### 72"``)
   is checked by the ``numeric_match`` reward (:mod:`posttrain.rewards.verifiers`): the last number in the
   response must equal it. A textual reference must appear in the response as whole words (or equal its final
   answer) after casefolding and whitespace collapsing; a list of references agrees if any one does. A textual
   reference of more than ``MAX_REFERENCE_WORDS`` (10) words is not compared (it would never be contained
   verbatim) and is counted as unchecked, and so is a reference that is neither text, number nor list.
2. **Broken code blocks** (:func:`code_problems`): a fence (```` ``` ```` or ``~~~``) never closed; a
   ``python``/``py``/``python3`` block that ``ast.parse`` rejects (a ``>>>`` session is checked on its prompt
   lines; notebook ``!``/``%`` lines are skipped); a ``json`` block that ``json.loads`` rejects (``jsonl``/
   ``ndjson``: each line).
3. **Invalid JSON where JSON is expected** (:func:`json_problem`): a response that starts like JSON (``{``, or
   ``[`` followed by ``{``, ``[``, ``"``, ``]`` or a number) must start with a complete JSON value. A prompt that
   asks for JSON (``JSON_REQUEST``: "in JSON", "as a valid JSON", "return/give/write ... JSON" within 4 words,
   "JSON format/only"; not "what is JSON?" nor "write a JSON file") needs a response whose first ``json`` (or
   untagged) fenced block parses, or, without such a block, that holds a JSON value the ``json_schema``
   reward's extraction finds. A response with a code block in another language (a Python function that
   returns JSON) is about JSON, not in it, and is not checked.

``summary.json`` key ``accuracy`` = ``{"reference": {"column_rows", "checked", "unchecked", "contradictions",
"examples"}, "code": {"blocks", "broken_rows", "examples"}, "json": {"expected", "invalid_rows", "examples"}}``;
each example is ``"file.jsonl:12: what is wrong"``.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass, field

from posttrain.rewards.verifiers import (
    extract_json,
    final_answer,
    last_number,
    normalize_answer,
    numeric_match,
)

REFERENCE_COLUMNS = ("reference", "answer", "ground_truth")
MAX_REFERENCE_WORDS = 10
MAX_EXAMPLES = 5
PYTHON_TAGS = ("python", "py", "python3")
JSON_REQUEST = re.compile(
    r"(?:\b(?:in|as|into)\s+(?:an?\s+)?(?:valid\s+|strict\s+)?json\b"  # "reply in JSON", "as a valid JSON"
    r"|\b(?:return|returns|respond|reply|output|format|give|provide|produce|generate|emit|write)\b"
    r"(?:\W+\w+){0,4}?\W+json\b)(?!\s+files?\b)"  # "give me the user as a JSON object", not "a JSON file"
    r"|\bjson\s+(?:format|only|output|response)\b", re.IGNORECASE)
_OPEN_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})([^`\n]*)$")
_CLOSE_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*$")
_NUMERIC_TEXT = re.compile(r"[-+$€£%\d\s.,/eE]+")
_JSON_START = re.compile(r"\{|\[\s*(?:[\[{\"\]]|-?\d)")


@dataclass
class CodeBlock:
    language: str  # the info string's first word, lowercased; "" for an untagged fence
    body: str
    line: int  # 1-based line of the opening fence in the response
    closed: bool


def code_blocks(text: str) -> list[CodeBlock]:
    """The fenced blocks of ``text``, CommonMark-style: a block closes at a fence line of the same character, at
    least as long, with no info string; one still open at the end is returned with ``closed=False``."""
    blocks: list[CodeBlock] = []
    fence, language, start, body = "", "", 0, []
    for number, line in enumerate(text.split("\n"), 1):
        if not fence:
            opening = _OPEN_FENCE.match(line)
            if opening:
                fence, start, body = opening.group(1), number, []
                language = (opening.group(2).split() or [""])[0].lower()
            continue
        closing = _CLOSE_FENCE.match(line)
        if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence):
            blocks.append(CodeBlock(language, "\n".join(body), start, True))
            fence = ""
        else:
            body.append(line)
    if fence:
        blocks.append(CodeBlock(language, "\n".join(body), start, False))
    return blocks


def _python_source(body: str) -> str:
    """What ``ast.parse`` should see: the prompt lines of a ``>>>`` session; notebook ``!``/``%`` lines as ``pass``."""
    lines = body.split("\n")
    if any(line.lstrip().startswith(">>>") for line in lines):
        lines = [line.lstrip()[4:] for line in lines if line.lstrip().startswith((">>>", "..."))]
    return "\n".join(re.sub(r"^(\s*)[!%].*", r"\1pass", line) for line in lines)


def python_error(body: str) -> str | None:
    """Why ``body`` is not valid Python (``ast.parse`` only: never executed), or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning for "\d" in a string is not an error
        try:
            ast.parse(_python_source(body))
        except SyntaxError as e:
            return f"{e.msg} at its line {e.lineno}"
        except (ValueError, RecursionError, MemoryError) as e:
            return str(e) or type(e).__name__
    return None


def json_error(body: str, lines: bool = False) -> str | None:
    """Why ``body`` (each non-empty line of it, with ``lines``) is not JSON, or None."""
    for i, chunk in enumerate(body.split("\n") if lines else [body], 1):
        if lines and not chunk.strip():
            continue
        try:
            json.loads(chunk)
        except json.JSONDecodeError as e:
            return f"{e.msg} at its line {e.lineno + i - 1}, column {e.colno}"
    return None


def code_problems(response: str) -> list[str]:
    """Every broken fenced block of ``response``, described."""
    problems = []
    for block in code_blocks(response):
        tag = f"```{block.language}" if block.language else "```"
        if not block.closed:
            problems.append(f"{tag} block opened at line {block.line} is never closed")
            continue
        if block.language in PYTHON_TAGS:
            error = python_error(block.body)
        elif block.language in ("json", "jsonl", "ndjson"):
            error = json_error(block.body, lines=block.language != "json")
        else:
            continue
        if error:
            problems.append(f"{tag} block at line {block.line}: {error}")
    return problems


def expects_json(prompt: str, response: str) -> bool:
    """True when the prompt asks for JSON or the response starts like JSON (see the module docstring)."""
    return bool(_JSON_START.match(response.lstrip()) or JSON_REQUEST.search(prompt))


def json_problem(prompt: str, response: str) -> str | None:
    """Why ``response`` fails where JSON is expected, or None (also None when no JSON is expected)."""
    text = response.strip()
    if _JSON_START.match(text):
        try:
            json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as e:
            return f"starts like JSON but does not parse: {e.msg} at line {e.lineno}, column {e.colno}"
        return None
    if not JSON_REQUEST.search(prompt):
        return None
    blocks = code_blocks(response)
    if any(b.language not in ("json", "") for b in blocks):
        return None  # answered with code in another language: the prompt is about JSON, not asking for it
    blocks = [b for b in blocks if b.language in ("json", "")]
    if blocks:
        error = json_error(blocks[0].body)
        return None if error is None else f"the prompt asks for JSON; its {'```' + blocks[0].language} block: {error}"
    try:
        extract_json(response)
    except ValueError:
        return "the prompt asks for JSON; the response holds none that parses"
    return None


def reference_of(data: dict) -> object | None:
    """The row's reference answer: the first of ``REFERENCE_COLUMNS`` present and not null."""
    for column in REFERENCE_COLUMNS:
        if data.get(column) is not None:
            return data[column]
    return None


def _numeric(reference: object) -> bool:
    if isinstance(reference, bool):
        return False
    if isinstance(reference, int | float):
        return True
    text = normalize_answer(final_answer(str(reference)))
    return bool(_NUMERIC_TEXT.fullmatch(text)) and last_number(text) is not None


def reference_problem(reference: object, response: str) -> str | None:
    """How ``response`` contradicts ``reference``, or None if it agrees. Raises ``ValueError`` when the reference
    cannot be compared (long text, or not text, number or list): the caller counts it as unchecked."""
    if isinstance(reference, list) and reference:
        problems = [reference_problem(r, response) for r in reference]
        return None if None in problems else f"matches none of the references {reference!r}"[:200]
    if _numeric(reference):
        if numeric_match(None, response, reference):
            return None
        found = last_number(response)
        return f"reference {reference!r}, the response's last number is {'none' if found is None else f'{found:g}'}"
    if not isinstance(reference, str | bool):
        raise ValueError(f"a reference of type {type(reference).__name__} is not compared")
    wanted = normalize_answer(final_answer(str(reference)))
    if not wanted or len(wanted.split()) > MAX_REFERENCE_WORDS:
        raise ValueError("an empty or long textual reference is not compared")
    said = " ".join(response.casefold().split())
    if wanted == normalize_answer(final_answer(response)) or re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", said):
        return None
    return f"reference {wanted!r} is not in the response"


@dataclass
class RowAccuracy:
    """A row's first problem under each check (None: fine or not applicable)."""

    reference: str | None = None
    broken_code: str | None = None
    invalid_json: str | None = None
    reference_checked: bool = False  # a reference was present and comparable
    reference_present: bool = False
    code_blocks: int = 0
    json_expected: bool = False


def check_row(turns: list[tuple[str, str]], data: dict) -> RowAccuracy:
    """Run the three checks on a row's (prompt, response) turns; ``data`` is the raw row (for its reference)."""
    result = RowAccuracy()
    for prompt, response in turns:
        result.code_blocks += len(code_blocks(response))
        result.broken_code = result.broken_code or next(iter(code_problems(response)), None)
        result.json_expected |= expects_json(prompt, response)
        result.invalid_json = result.invalid_json or json_problem(prompt, response)
    reference = reference_of(data)
    if reference is not None and turns:
        result.reference_present = True
        try:
            result.reference = reference_problem(reference, turns[-1][1])
            result.reference_checked = True
        except ValueError:
            pass
    return result


@dataclass
class AccuracyTally:
    """The three checks over every row, added one at a time."""

    reference_rows: int = 0
    reference_checked: int = 0
    contradictions: list[tuple[str, str]] = field(default_factory=list)  # (where, detail)
    code_blocks: int = 0
    broken_code: list[tuple[str, str]] = field(default_factory=list)
    json_expected: int = 0
    invalid_json: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, turns: list[tuple[str, str]], data: dict) -> RowAccuracy:
        row = check_row(turns, data)
        self.reference_rows += row.reference_present
        self.reference_checked += row.reference_checked
        self.code_blocks += row.code_blocks
        self.json_expected += row.json_expected
        for problems, detail in ((self.contradictions, row.reference), (self.broken_code, row.broken_code),
                                 (self.invalid_json, row.invalid_json)):
            if detail is not None:
                problems.append((where, detail))
        return row

    def summary(self) -> dict:
        def examples(problems: list[tuple[str, str]]) -> list[str]:
            return [f"{w}: {d}" for w, d in problems[:MAX_EXAMPLES]]

        return {
            "reference": {"column_rows": self.reference_rows, "checked": self.reference_checked,
                          "unchecked": self.reference_rows - self.reference_checked,
                          "contradictions": len(self.contradictions), "examples": examples(self.contradictions)},
            "code": {"blocks": self.code_blocks, "broken_rows": len(self.broken_code),
                     "examples": examples(self.broken_code)},
            "json": {"expected": self.json_expected, "invalid_rows": len(self.invalid_json),
                     "examples": examples(self.invalid_json)},
        }


def accuracy_markdown(accuracy: dict) -> list[str]:
    """The report's Markdown for the summary's ``accuracy`` section."""
    ref, code, js = accuracy["reference"], accuracy["code"], accuracy["json"]
    reference = "no reference column" if not ref["column_rows"] else (
        f"{ref['contradictions']} of {ref['checked']} rows checked against their reference contradict it"
        + (f" ({ref['unchecked']} references too long or not comparable)" if ref["unchecked"] else ""))
    lines = ["## Accuracy signals", "",
             f"{reference}; {code['broken_rows']} rows with a broken code block ({code['blocks']} blocks in all); "
             f"{js['invalid_rows']} of {js['expected']} rows expected to hold JSON do not parse", ""]
    examples = ref["examples"] + code["examples"] + js["examples"]
    return lines + [f"- {e}" for e in examples] + ([""] if examples else [])
