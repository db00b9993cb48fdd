"""LLM-as-a-judge rewards from any OpenAI-compatible chat completions server (vLLM, SGLang, TGI, OpenAI).

The judge is asked to rate each response from 1 to 10; the reward is ``(score - 1) / 9`` in [0, 1]. The score
read from the reply is the last ``Score: N`` if there is one, else the last ``N/10``, else the last number, so
a judge may reason before it scores. A reply without a score in 1..10 is ``nan``, like any row whose request
failed, and is counted in ``.errors`` (``.last_error`` keeps the latest message).

Requests run ``concurrency`` at a time. Timeouts, connection errors, 429 and 5xx are retried ``retries`` times
with exponential backoff (``backoff * 2**attempt`` seconds, or the server's ``Retry-After`` if longer); other
4xx mean the request itself is wrong and are not retried. Identical (prompt, completion) pairs in a batch
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
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from posttrain.errors import ConfigError

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
_MAX_RETRY_AFTER_S = 60.0


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


class _Retryable(Exception):
    def __init__(self, message: str, wait_s: float = 0.0):
        super().__init__(message)
        self.wait_s = wait_s


class JudgeReward:
    """Scores completions with an LLM judge; ``template`` holds ``{prompt}`` and ``{completion}``."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 template: str = DEFAULT_TEMPLATE, timeout: float = 30, retries: int = 3, backoff: float = 0.5,
                 concurrency: int = 4, cache_path: str | Path | None = None, name: str = "judge"):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge: base_url {base_url!r} must start with http:// or https:// (e.g. "
                              "http://localhost:8000/v1)")
        if "{completion}" not in template:
            raise ConfigError("judge: template has no {completion} placeholder; the judge would never see the "
                              "response it grades")
        if retries < 0 or concurrency < 1 or timeout <= 0:
            raise ConfigError(f"judge: expected retries >= 0, concurrency >= 1 and timeout > 0; got retries="
                              f"{retries}, concurrency={concurrency}, timeout={timeout}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.template, self.name = model, template, name
        self.retries, self.backoff, self.concurrency = retries, backoff, concurrency
        self.errors, self.last_error = 0, None
        self.requests = 0  # HTTP requests sent, retries included
        api_key = os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout))
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

    # -- requests -----------------------------------------------------------------------------------------------

    def _post_once(self, content: str) -> str:
        """The judge's reply; _Retryable for errors worth retrying, RuntimeError for the rest."""
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0.0}
        try:
            response = self._client.post(self.url, json=body)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timed out ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        if response.status_code == 429 or response.status_code >= 500:
            retry_after = response.headers.get("Retry-After", "")
            wait_s = min(float(retry_after), _MAX_RETRY_AFTER_S) if retry_after.isdigit() else 0.0
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}", wait_s)
        if response.status_code >= 400:
            raise RuntimeError(f"HTTP {response.status_code} (not retried): {response.text[:200]}")
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise RuntimeError(f"not a chat completion response: {response.text[:200]}") from None

    def _judge(self, prompt, completion: str) -> tuple[str | None, str | None]:
        """(reply, None), or (None, error message) once retries are spent or the error is not retryable."""
        content = self.template.replace("{prompt}", render_prompt(prompt)).replace("{completion}", completion)
        for attempt in range(self.retries + 1):
            with self._lock:
                self.requests += 1
            try:
                return self._post_once(content), None
            except RuntimeError as e:
                return None, str(e)
            except _Retryable as e:
                if attempt == self.retries:
                    return None, f"{e} (after {self.retries + 1} attempts)"
                time.sleep(max(self.backoff * 2**attempt, e.wait_s))
        raise AssertionError("unreachable")

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
            with ThreadPoolExecutor(min(self.concurrency, len(todo))) as pool:
                results = dict(zip(todo, pool.map(lambda pair: self._judge(*pair), todo.values())))
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
        self._client.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
