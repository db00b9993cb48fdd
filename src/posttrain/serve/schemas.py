"""Request bodies of the HTTP API (pydantic), and OpenAI-style errors.

Requests follow OpenAI's chat completions API. Fields OpenAI defines but this server cannot honour are accepted
only with their neutral value (``n: 1``, penalties 0, no tools, no logprobs) and rejected otherwise, so a client
is never silently given something other than what it asked for; fields OpenAI does not define are rejected.

Types are strict: ``max_tokens: "5"`` or ``true`` is a 400, not 5 or 1, and non-finite floats are refused. Before
validation, :func:`check_json` refuses JSON nested deeper than :data:`MAX_DEPTH` and strings holding lone UTF-16
surrogates (``"\ud800"``: valid JSON, but no UTF-8 text, so neither the tokenizer nor the store can take it).
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "server_overloaded"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def parse(model: type[BaseModel], body: object) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field (``messages.0.role``)."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or None
        text = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        if text.startswith("Value error, "):
            text = text[len("Value error, "):]
        raise APIError(400, f"{field}: {text}" if field else text, param=field, code="invalid_value") from None


MAX_DEPTH = 32  # JSON nesting a request may have (a chat request needs 4)


def check_json(value: object, max_depth: int = MAX_DEPTH) -> None:
    """A 400 naming the field for nesting deeper than ``max_depth`` or a string that is not valid Unicode text
    (a lone surrogate). Iterative: a hostile depth cannot exhaust the stack."""
    todo: list[tuple[object, tuple, int]] = [(value, (), 0)]
    while todo:
        item, path, depth = todo.pop()
        field = ".".join(map(str, path)) or None
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{field or 'body'}: not valid Unicode text (a lone surrogate such as \\ud800)",
                               param=field, code="invalid_value") from None
            continue
        if not isinstance(item, dict | list):
            continue
        if depth >= max_depth:
            raise APIError(400, f"{field or 'body'}: JSON nested deeper than {max_depth} levels", param=field,
                           code="invalid_value")
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(key, str):
                todo.append((key, path, depth + 1))  # keys are text too
            todo.append((child, (*path, key), depth + 1))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict:
        """``{"role", "content"}`` for the chat template; a developer message is a system message here."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    logprobs: bool | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        if self.n not in (None, 1):
            raise ValueError("n: only n=1 is supported; send several requests for several completions")
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens: differs from max_completion_tokens; give one of them")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported by posttrain serve (leave it out or 0)")
        if self.logprobs:
            raise ValueError("logprobs: not supported by posttrain serve")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools: tool calling is not supported by posttrain serve")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {type: text} is supported by posttrain serve")
        if isinstance(self.stop, list) and not all(self.stop):
            raise ValueError("stop: stop strings must not be empty")
        if self.stop == "":
            raise ValueError("stop: must not be empty")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# feedback field -> the store's kind
FEEDBACK_KINDS = {"thumbs": "thumbs", "rating": "rating", "preferred_over": "preference", "correction": "correction"}


class FeedbackRequest(_Strict):
    completion_id: str = Field(min_length=1)
    thumbs: Literal["up", "down"] | None = None
    rating: int | None = Field(default=None, ge=1, le=5, strict=True)
    preferred_over: str | None = Field(default=None, min_length=1)
    correction: str | None = Field(default=None, min_length=1)
    comment: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> FeedbackRequest:
        given = [name for name in FEEDBACK_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(FEEDBACK_KINDS)}; got {', '.join(given) or 'none'}")
        return self

    def kind_and_value(self) -> tuple[str, str, object]:
        """(request field, store kind, value)."""
        (field,) = [name for name in FEEDBACK_KINDS if getattr(self, name) is not None]
        return field, FEEDBACK_KINDS[field], getattr(self, field)


class VersionRequest(_Strict):
    """``POST /v1/admin/versions``: serve a version of the loop's registry (never a path: module app.py)."""

    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=128)
    reason: str = Field(default="", max_length=1000)
