"""LLM-as-a-judge rewards from any OpenAI-compatible chat completions server (vLLM, SGLang, TGI, OpenAI).

The judge is asked to rate each response from 1 to 10; the reward is ``(score - 1) / 9`` in [0, 1]. The score
read from the reply is the last ``Score: N`` if there is one, else the last ``N/10``, else the last number, so
a judge may reason before it scores. A reply without a score in 1..10 is ``nan``, like any row whose request
failed, and is counted in ``.errors`` (``.last_error`` keeps the latest message).

Requests go through :class:`posttrain.openai_compat.ChatClient`: ``concurrency`` at a time, at most
``rate_limit`` per second, timeouts/connection errors/429/5xx retried ``retries`` times with exponential backoff
(or the server's ``Retry-After``); other 4xx are not retried. Identical (prompt, completion) pairs in a batch
share one request.

Judgments are cached by sha256(model, template, prompt, completion): in memory always, and in a SQLite file
when ``cache_path`` is set (WAL mode, so several trainer processes can share one), so re-scoring the same
completion, or resuming a run, costs no request. The cache stores the judge's reply, not the score, so a change
to score parsing applies to cached replies too; failed requests are not cached.

The API key is read from the environment variable named by ``api_key_env`` (unset: no Authorization header)
and appears in no message or log.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import threading
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.openai_compat import ChatClient

DEFAULT_TEMPLATE = """You are grading an AI assistant's response to a user's request.

[Request]
{prompt}

[Response]
{completion}

Rate how well the response fulfils the request: correctness, helpfulness and clarity. Think briefly, then end \
your reply with a line of the form "Score: N", where N is an integer from 1 (useless) to 10 (perfect)."""

_SCORE_MARKER = re.compile(r"score\W{0,4}?(\d+(?:\.\d+)?)", re.IGNORECASE)
_OUT_OF_TEN = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*/\s*10(?!\d)")
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")


def parse_score(reply: str) -> float | None:
    """The 1-10 score in a judge's reply mapped to [0, 1], or None if there is none in range."""
    for pattern in (_SCORE_MARKER, _OUT_OF_TEN, _NUMBER):
        matches = pattern.findall(reply)
        if matches:
            score = float(matches[-1])
            return (score - 1) / 9 if 1 <= score <= 10 else None
    return None


def render_prompt(prompt: str | list[dict]) -> str:
    """A chat prompt as ``role: content`` lines; a string as is."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class JudgeReward:
    """Scores completions with an LLM judge; ``template`` holds ``{prompt}`` and ``{completion}``."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 template: str = DEFAULT_TEMPLATE, timeout: float = 30, retries: int = 3, backoff: float = 0.5,
                 concurrency: int = 4, rate_limit: float = 0.0, cache_path: str | Path | None = None,
                 name: str = "judge"):
        if "{completion}" not in template:
            raise ConfigError("judge: template has no {completion} placeholder; the judge would never see the "
                              "response it grades")
        self.client = ChatClient(base_url, model, api_key_env=api_key_env, timeout=timeout, retries=retries,
                                 backoff=backoff, concurrency=concurrency, rate_limit=rate_limit, what="judge")
        self.model, self.template, self.name = model, template, name
        self.errors, self.last_error = 0, None
        self._memory: dict[str, str] = {}
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        if cache_path is not None:
            Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(cache_path), timeout=30.0, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
            self._db.commit()

    # -- cache --------------------------------------------------------------------------------------------------

    def _key(self, prompt, completion: str) -> str:
        text = json.dumps([self.model, self.template, prompt, completion], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def _cached(self, key: str) -> str | None:
        if key not in self._memory and self._db is not None:
            row = self._db.execute("SELECT reply FROM judgments WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self._memory[key] = row[0]
        return self._memory.get(key)

    def _store(self, replies: dict[str, str]) -> None:
        self._memory.update(replies)
        if self._db is not None and replies:
            with self._db:  # one transaction per batch
                self._db.executemany("INSERT OR REPLACE INTO judgments (key, reply) VALUES (?, ?)", replies.items())

    @property
    def requests(self) -> int:
        """HTTP requests sent, retries included."""
        return self.client.requests

    # -- the batch interface ------------------------------------------------------------------------------------

    def __call__(self, prompts: list, completions: list[str], rows: list[dict]) -> list[float]:
        if not len(prompts) == len(completions) == len(rows):
            raise ValueError(f"judge batch: {len(prompts)} prompts, {len(completions)} completions and "
                             f"{len(rows)} rows; expected one of each per sample")
        keys = [self._key(p, c) for p, c in zip(prompts, completions)]
        todo = {}  # key -> (prompt, completion), each uncached pair once
        for key, prompt, completion in zip(keys, prompts, completions):
            if key not in todo and self._cached(key) is None:
                todo[key] = (prompt, completion)
        failures: dict[str, str] = {}
        if todo:
            contents = [[{"role": "user", "content": self.template.replace("{prompt}", render_prompt(p))
                          .replace("{completion}", c)}] for p, c in todo.values()]
            results = dict(zip(todo, self.client.map(contents, temperature=0.0)))
            self._store({key: reply for key, (reply, _) in results.items() if reply is not None})
            failures = {key: error for key, (reply, error) in results.items() if reply is None}
        scores = []
        for index, key in enumerate(keys):
            score = None if key in failures else parse_score(self._memory[key])
            if score is None:
                reason = failures.get(key) or f"no score in 1..10 in the reply {self._memory[key][-200:]!r}"
                self.errors, self.last_error = self.errors + 1, f"{self.name}: row {index}: {reason}"
            scores.append(math.nan if score is None else score)
        return scores

    def close(self) -> None:
        self.client.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
