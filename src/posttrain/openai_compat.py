"""A small client for OpenAI-compatible ``/chat/completions`` servers (OpenAI, vLLM, SGLang, TGI, Ollama,
``posttrain serve``), shared by the LLM judge and the synthetic-data teacher.

- **Retries**: timeouts, connection errors, 429 and 5xx are retried ``retries`` times with exponential backoff
  (``backoff * 2**attempt`` seconds, or the server's ``Retry-After`` if longer, capped at 60 s); any other 4xx
  means the request itself is wrong and is not retried.
- **Rate limit**: at most ``rate_limit`` requests per second across all threads (a token bucket holding one
  second's worth of requests; 0 = no limit), retries included, so a 429 storm is not made worse.
- **Concurrency**: :meth:`ChatClient.map` runs ``concurrency`` requests at a time and returns, per request,
  the reply or the error message, in input order.

The API key is read from the environment variable named by ``api_key_env`` (unset: no Authorization header)
and appears in no message or log.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from posttrain.errors import ConfigError

MAX_RETRY_AFTER_S = 60.0


class RateLimiter:
    """Token bucket: ``acquire()`` blocks until a request may start; ``rate`` per second, bursts up to ``rate``.

    ``clock`` and ``sleep`` are injectable so the schedule can be tested without waiting."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if rate < 0:
            raise ConfigError(f"rate_limit: must be >= 0 requests/s (0 = no limit), got {rate}")
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.updated = clock()
        self.lock = threading.Lock()

    def acquire(self) -> None:
        if self.rate == 0:
            return
        while True:
            with self.lock:
                now = self.clock()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                wait = (1.0 - self.tokens) / self.rate
            self.sleep(wait)


class Retryable(Exception):
    def __init__(self, message: str, wait_s: float = 0.0):
        super().__init__(message)
        self.wait_s = wait_s


class ChatClient:
    """``chat(messages, **params) -> reply text`` against ``{base_url}/chat/completions`` with retries."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 retries: int = 3, backoff: float = 0.5, concurrency: int = 4, rate_limit: float = 0.0,
                 what: str = "endpoint"):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{what}: base_url {base_url!r} must start with http:// or https:// (e.g. "
                              "http://localhost:8000/v1)")
        if retries < 0 or concurrency < 1 or timeout <= 0:
            raise ConfigError(f"{what}: expected retries >= 0, concurrency >= 1 and timeout > 0; got retries="
                              f"{retries}, concurrency={concurrency}, timeout={timeout}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.retries, self.backoff, self.concurrency = model, retries, backoff, concurrency
        self.limiter = RateLimiter(rate_limit)
        self.requests = 0  # HTTP requests sent, retries included
        self._count_lock = threading.Lock()
        api_key = os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout))

    def _post_once(self, body: dict) -> str:
        """The reply's text; Retryable for errors worth retrying, RuntimeError for the rest."""
        self.limiter.acquire()
        with self._count_lock:
            self.requests += 1
        try:
            response = self._client.post(self.url, json=body)
        except httpx.TimeoutException as e:
            raise Retryable(f"timed out ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise Retryable(f"{type(e).__name__}: {e}") from None
        if response.status_code == 429 or response.status_code >= 500:
            retry_after = response.headers.get("Retry-After", "")
            wait_s = min(float(retry_after), MAX_RETRY_AFTER_S) if retry_after.isdigit() else 0.0
            raise Retryable(f"HTTP {response.status_code}: {response.text[:200]}", wait_s)
        if response.status_code >= 400:
            raise RuntimeError(f"HTTP {response.status_code} (not retried): {response.text[:200]}")
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise RuntimeError(f"not a chat completion response: {response.text[:200]}") from None

    def chat(self, messages: list[dict], **params) -> str:
        """The reply to ``messages``; ``params`` (temperature, max_tokens, top_p, seed, ...) go into the body.
        Raises RuntimeError with the reason once retries are spent or the error is not retryable."""
        body = {"model": self.model, "messages": messages, **params}
        for attempt in range(self.retries + 1):
            try:
                return self._post_once(body)
            except Retryable as e:
                if attempt == self.retries:
                    raise RuntimeError(f"{e} (after {self.retries + 1} attempts)") from None
                time.sleep(max(self.backoff * 2**attempt, e.wait_s))
        raise AssertionError("unreachable")

    def map(self, conversations: list[list[dict]], **params) -> list[tuple[str | None, str | None]]:
        """(reply, None) or (None, error) per conversation, in order, ``concurrency`` requests at a time."""

        def one(messages):
            try:
                return self.chat(messages, **params), None
            except RuntimeError as e:
                return None, str(e)

        if not conversations:
            return []
        with ThreadPoolExecutor(min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(one, conversations))

    def close(self) -> None:
        self._client.close()
