"""The FastAPI app: OpenAI's chat completions and models endpoints, feedback, and version switches.

Endpoints (all under ``Authorization: Bearer <key>`` unless auth is off; ``/health`` is open; an admin key also
works where an API key does, an API key never works where an admin key is needed):
- ``POST /v1/chat/completions``: OpenAI's request and response, streamed as server-sent events with ``stream``.
  ``system_fingerprint`` is the version of the model that answered.
- ``GET /v1/models``: the served names, each with its current ``version``.
- ``POST /v1/feedback``: ``{completion_id, one of thumbs | rating | preferred_over | correction, comment?}``;
  answered 200 only once the store has committed it.
- ``POST /v1/feedback`` only accepts feedback from the key that made the completion (``feedback_any_key`` lifts
  that), with a comment of at most ``max_comment_chars``.
- ``POST /v1/admin/versions`` (admin key only; off when no admin key is configured): ``{model, version, reason?}``
  serves a version of the loop's registry (``registry=``) under ``model`` from the next request on (promotion and
  rollback without a restart; see models.py). Only versions that passed their gates (or an operator's audited
  override) are accepted, never a rejected one, and never a path: adapters from arbitrary directories are served
  only when named on the command line at start-up. At most ``max_served_names`` names.
- ``GET /openapi.json`` needs a key too; there are no ``/docs`` pages. ``GET /health`` says which engine
  generates (``builtin`` or ``vllm``) and how many requests wait.

Logging: every completion is written to the store with its id, model name, version, prompt messages, response and
sampling settings (plus its ``finish_reason``) *before* its last byte is sent, so a client that has the whole
answer can give feedback on it at once. A streamed answer whose client disconnects is logged with the text sent
so far and ``finish_reason: "disconnected"`` (the client saw that text and holds the id, so feedback on it must
find it), and its generation stops at the next decoding step.

Client mistakes get 4xx with OpenAI's error body, never 500: malformed JSON 400 (``NaN``/``Infinity`` included),
JSON nested too deep or holding lone surrogates 400, invalid fields or wrong types 400 naming the field, a missing
or wrong key 401, a user key on an admin route 403, an unknown model or completion id 404, a body over
``max_body_bytes`` 413. A full queue gets 503 with ``Retry-After``. A request whose sampling goes numerically wrong
fails alone (``generation_failed``), never the other requests of its batch. A non-streamed request whose client
hangs up stops generating within a decoding step or two, like a stream.

"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.errors import PosttrainError
from posttrain.feedback.store import UnknownCompletion
from posttrain.generation import encode_prompt
from posttrain.loop.registry import Registry
from posttrain.serve.decode import Delta, Event, Failed, Finished, Job, RowSampling
from posttrain.serve.models import Lease, ModelRegistry, UnknownModel
from posttrain.serve.schemas import APIError, ChatRequest, FeedbackRequest, VersionRequest, check_json, parse
from posttrain.serve.worker import QueueFull

if TYPE_CHECKING:
    from posttrain.commands.serve import ServeConfig

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


# ------------------------------------------------------------------------------------------ request size
class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413, by its Content-Length or while it is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over this server's limit of {self.max_bytes} bytes (max_body_bytes)",
                        code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await APIError(400, "Content-Length: not a number").response()(scope, receive, send)
            if int(length) > self.max_bytes:
                return await self._too_large().response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited_receive, send)


# ------------------------------------------------------------------------------------------ helpers
def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (only finite numbers are)")


async def _json_body(request: Request) -> object:
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and NaN/Infinity
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
    check_json(body)
    return body


def key_id(key: bytes) -> str:
    """Who made a completion, without storing the key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(key).hexdigest()[:16]


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass
class _Completion:
    """An admitted chat request: its lease, its job in the worker and the channel its events arrive on."""

    id: str
    created: int
    owner: str | None  # key_id of the API key that asked; None when auth is off
    lease: Lease
    messages: list[dict]
    sampling: RowSampling
    prompt_tokens: int
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    job: Job
    events: asyncio.Queue

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.lease.model,
                "system_fingerprint": self.lease.version,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


# ------------------------------------------------------------------------------------------ endpoints
class ServeAPI:
    """What the endpoints do, over a model registry and a completion/feedback store; :func:`create_app` routes
    HTTP to it. ``api_keys=None`` means auth is off."""

    def __init__(self, registry: ModelRegistry, store, cfg: ServeConfig, api_keys: list[str] | None,
                 admin_keys: list[str] | None = None):
        assert api_keys is None or api_keys, "auth on needs at least one key"
        self.registry, self.store, self.cfg = registry, store, cfg
        self.keys = None if api_keys is None else [k.encode() for k in api_keys]
        self.admin_keys = [k.encode() for k in admin_keys or []]
        assert not set(self.admin_keys) & set(self.keys or []), "an admin key must not also be an API key"
        # logs of streams whose client went away, written after their handler is gone
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-log")

    @staticmethod
    def _bearer(request: Request) -> bytes | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token.strip().encode() if scheme.lower() == "bearer" else None

    @staticmethod
    def _matches(given: bytes | None, keys: list[bytes]) -> bool:
        # compare_digest against every key: the time taken says nothing about which key nearly matched
        return given is not None and any([hmac.compare_digest(given, k) for k in keys])

    def authorize(self, request: Request) -> None:
        """API routes: an API key or an admin key. Sets ``request.state.owner`` (the key's id)."""
        given = self._bearer(request)
        if self._matches(given, self.admin_keys):
            request.state.owner = key_id(given)
            return
        if self.keys is None:
            request.state.owner = None
            return
        if not self._matches(given, self.keys):
            raise APIError(401, "invalid or missing API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")
        request.state.owner = key_id(given)

    def authorize_admin(self, request: Request) -> None:
        """Admin routes: an admin key only; off when none is configured."""
        if not self.admin_keys:
            raise APIError(403, f"admin routes are off: start the server with an admin key in "
                           f"${self.cfg.admin_key_env} (distinct from the API keys)", code="admin_disabled")
        given = self._bearer(request)
        if self._matches(given, self.admin_keys):
            return
        if given is not None and self.keys is not None and self._matches(given, self.keys):
            raise APIError(403, "this is an API key; admin routes need an admin key", code="admin_key_required")
        raise APIError(401, "invalid or missing admin key: send the header `Authorization: Bearer <admin key>`",
                       code="invalid_api_key")

    # ---------------------------------------------------------------------------------- models
    async def health(self):
        return {"status": "ok", "engine": self.registry.engine, "queued": self.registry.worker.queued()}

    async def models(self):
        data = [{"id": name, "object": "model", "created": self.registry.created, "owned_by": "posttrain",
                 "version": version} for name, version in self.registry.served().items()]
        return {"object": "list", "data": data}

    async def set_version(self, request: Request):
        raw = await _json_body(request)
        if isinstance(raw, dict) and "adapter" in raw:
            raise APIError(400, "adapter: paths are not accepted over HTTP; give the `version` of a registry entry "
                           "(adapters from directories are served only when named at start-up)", param="adapter")
        body = parse(VersionRequest, raw)
        if not self.cfg.registry:
            raise APIError(409, "this server has no registry (registry=): admin switches serve versions of the "
                           "loop's registry only", param="version", code="no_registry")
        registry = Registry(self.cfg.registry)
        try:
            adapter = registry.adapter_of(body.version)
        except PosttrainError as e:
            raise APIError(404, str(e), param="version", code="version_not_found") from None
        servable, why = registry.servable(body.version)
        if not servable:
            raise APIError(403, why, param="version", code="version_not_servable")
        if adapter is None:
            raise APIError(409, f"version '{body.version}' is the base model alone; it is served as "
                           f"'{self.registry.base_name}'", param="version")
        served = self.registry.served()
        if body.model not in served and len(served) - 1 >= self.cfg.max_served_names:
            raise APIError(409, f"model: this server already serves {len(served) - 1} adapter names "
                           f"(max_served_names={self.cfg.max_served_names})", param="model", code="too_many_models")
        try:
            previous = await run_in_threadpool(self.registry.set_version, body.model, adapter, body.version)
        except PosttrainError as e:
            raise APIError(409, str(e), param="version") from None
        log.info("admin: model %s now serves version %s (was %s)%s", body.model, body.version, previous,
                 f": {body.reason}" if body.reason else "")
        return {"model": body.model, "version": body.version, "previous_version": previous}

    # ---------------------------------------------------------------------------------- completions
    async def chat_completions(self, request: Request):
        c = await self._admit(parse(ChatRequest, await _json_body(request)), request.state.owner)
        if c.stream:
            return StreamingResponse(self._stream(c), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces, done, checked = [], None, time.monotonic()
        try:
            while done is None:
                try:
                    event = await asyncio.wait_for(c.events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():  # nobody to answer: stop generating (finally below)
                        log.info("client of %s hung up before its answer; generation cancelled", c.id)
                        return JSONResponse({}, status_code=499)
                if event is None:
                    continue
                if isinstance(event, Delta):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    done = event
                else:
                    assert isinstance(event, Failed)
                    raise APIError(event.status, event.message, code="generation_failed")
        finally:
            if done is None:
                c.job.cancelled.set()
        text = "".join(pieces)
        await self._logged(c, text, done.finish_reason)
        return {"id": c.id, "object": "chat.completion", "created": c.created, "model": c.lease.model,
                "system_fingerprint": c.lease.version,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": done.finish_reason}],
                "usage": c.usage(done.completion_tokens)}

    def _check_limits(self, body: ChatRequest, prompt_tokens: int, max_tokens: int) -> None:
        cfg, context = self.cfg, self.registry.context_length
        if len(body.messages) > cfg.max_messages:
            raise APIError(400, f"messages: {len(body.messages)} messages, over this server's limit of "
                           f"{cfg.max_messages}", param="messages")
        stops = body.stop_list()
        if len(stops) > cfg.max_stop_strings:
            raise APIError(400, f"stop: {len(stops)} stop strings, over this server's limit of {cfg.max_stop_strings}",
                           param="stop")
        if any(len(s) > cfg.max_stop_chars for s in stops):
            raise APIError(400, f"stop: a stop string of {max(map(len, stops))} characters, over this server's limit "
                           f"of {cfg.max_stop_chars}", param="stop")
        if max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens: {max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
                           param="max_tokens")
        if prompt_tokens > cfg.max_prompt_tokens:
            raise APIError(400, f"messages: the prompt is {prompt_tokens} tokens, over this server's limit of "
                           f"{cfg.max_prompt_tokens}", param="messages")
        if context is not None and prompt_tokens + max_tokens > context:
            raise APIError(400, f"messages: the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
                           f"exceed the model's context of {context} tokens", param="messages")

    async def _admit(self, body: ChatRequest, owner: str | None) -> _Completion:
        """Check the request, take a lease on the model version and queue the job."""
        cfg = self.cfg
        max_tokens = body.max_tokens or body.max_completion_tokens or min(cfg.sampling.max_tokens, cfg.max_tokens_limit)
        self._check_limits(body, 0, max_tokens)  # cheap checks before tokenizing
        messages = [m.as_dict() for m in body.messages]
        try:
            prompt_ids = await run_in_threadpool(partial(encode_prompt, self.registry.tokenizer, messages,
                                                         content_as_text=not cfg.allow_control_tokens))
        except (TemplateError, ValueError) as e:
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from None
        self._check_limits(body, len(prompt_ids), max_tokens)
        try:
            lease = self.registry.acquire(body.model)
        except UnknownModel as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        sampling = RowSampling(
            max_tokens=max_tokens,
            temperature=body.temperature if body.temperature is not None else cfg.sampling.temperature,
            top_p=body.top_p if body.top_p is not None else cfg.sampling.top_p,
            stop=body.stop_list(),
        )
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:  # called on the model thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass

        try:
            job = self.registry.submit(lease, prompt_ids, sampling, emit)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        return _Completion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), owner=owner, lease=lease,
                           messages=messages,
                           sampling=sampling, prompt_tokens=len(prompt_ids), stream=body.stream,
                           include_usage=body.stream_options is not None and body.stream_options.include_usage,
                           job=job, events=events)

    async def _stream(self, c: _Completion):
        sent: list[str] = []
        ended = False  # logged (or being logged), or failed: nothing left to log on the way out
        try:
            yield _sse(c.chunk({"role": "assistant", "content": ""}))
            while True:
                event = await c.events.get()
                if isinstance(event, Delta):
                    sent.append(event.text)
                    yield _sse(c.chunk({"content": event.text}))
                    continue
                ended = True
                if isinstance(event, Failed):
                    yield _sse({"error": {"message": event.message, "type": "server_error", "code": "generation_failed"}})
                    return
                try:
                    await self._logged(c, "".join(sent), event.finish_reason)
                except APIError as e:
                    yield _sse({"error": {"message": e.message, "type": "server_error", "code": e.code}})
                    return
                yield _sse(c.chunk({}, event.finish_reason))
                if c.include_usage:
                    yield _sse({**c.chunk({}), "choices": [], "usage": c.usage(event.completion_tokens)})
                yield _sse("[DONE]")
                return
        finally:
            if not ended:  # the client went away (module docstring): stop generating, log what it was sent
                c.job.cancelled.set()
                self.background.submit(self._log_disconnected, c, "".join(sent))

    # ---------------------------------------------------------------------------------- completion log
    def _log(self, c: _Completion, response: str, finish_reason: str) -> None:
        """Blocking: the store commits before it returns."""
        self.store.log_completion(
            id=c.id, model=c.lease.model, version=c.lease.version, messages=c.messages, response=response,
            sampling={"max_tokens": c.sampling.max_tokens, "temperature": c.sampling.temperature,
                      "top_p": c.sampling.top_p, "stop": c.sampling.stop, "stream": c.stream,
                      "finish_reason": finish_reason},
            created=float(c.created), owner=c.owner,
        )

    async def _logged(self, c: _Completion, response: str, finish_reason: str) -> None:
        try:
            await run_in_threadpool(self._log, c, response, finish_reason)
        except Exception as e:
            log.exception("could not log completion %s", c.id)
            raise APIError(503, f"the completion store is unavailable ({type(e).__name__}); the completion was not "
                           "returned", code="store_unavailable") from None

    def _log_disconnected(self, c: _Completion, response: str) -> None:
        try:
            self._log(c, response, "disconnected")
        except Exception:
            log.exception("could not log the disconnected stream %s", c.id)

    # ---------------------------------------------------------------------------------- feedback
    async def feedback(self, request: Request):
        body = parse(FeedbackRequest, await _json_body(request))
        field, kind, value = body.kind_and_value()
        if body.comment is not None and len(body.comment) > self.cfg.max_comment_chars:
            raise APIError(400, f"comment: {len(body.comment)} characters, over this server's limit of "
                           f"{self.cfg.max_comment_chars}", param="comment")
        owner = None if self.cfg.feedback_any_key else request.state.owner
        try:
            feedback_id = await run_in_threadpool(
                partial(self.store.add_feedback, completion_id=body.completion_id, kind=kind, value=value,
                        comment=body.comment, owner=owner))
        except UnknownCompletion as e:
            param = "completion_id" if e.completion_id == body.completion_id else field
            raise APIError(404, str(e), param=param, code="completion_not_found") from None
        except ValueError as e:
            message = str(e)
            if message.startswith("value:"):  # the store names its argument; the client knows the field
                message = field + message[len("value"):]
            raise APIError(400, message, param=field) from None
        return {"id": feedback_id, "status": "recorded"}


# ------------------------------------------------------------------------------------------ the app
def _add_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, e: BodyTooLarge):
        return APIError(413, f"request body over this server's limit of {max_body_bytes} bytes (max_body_bytes)",
                        code="request_too_large").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        error = e.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        return APIError(400, f"{field}: {error['msg']}", param=field).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": f"internal server error: {type(e).__name__}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)


def create_app(registry: ModelRegistry, store, cfg: ServeConfig, api_keys: list[str] | None,
               admin_keys: list[str] | None = None) -> FastAPI:
    """The HTTP API over ``registry`` (started by the caller) and ``store`` (``log_completion`` and ``add_feedback``,
    as posttrain.feedback.store.FeedbackStore). ``api_keys=None`` turns auth off: callers pass it only when the
    config says so explicitly. No ``admin_keys``: the admin routes are off."""
    api = ServeAPI(registry, store, cfg, api_keys, admin_keys)
    app = FastAPI(title="posttrain serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    _add_error_handlers(app, cfg.max_body_bytes)
    protected = [Depends(api.authorize)]
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"], dependencies=protected)
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"], dependencies=protected)
    app.add_api_route("/v1/feedback", api.feedback, methods=["POST"], dependencies=protected)
    app.add_api_route("/v1/admin/versions", api.set_version, methods=["POST"],
                      dependencies=[Depends(api.authorize_admin)])
    app.add_api_route("/openapi.json", lambda: app.openapi(), methods=["GET"], include_in_schema=False,
                      dependencies=protected)
    return app
