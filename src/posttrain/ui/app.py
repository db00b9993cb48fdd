"""The dashboard's web app (``posttrain ui``): a page and the JSON it reads, on the same FastAPI stack as the server.

Routes (``/api/*`` under ``Authorization: Bearer <key>`` whenever a key is configured; the page and its assets
carry no data and are open):

- ``GET /``: the page (``static/index.html``, ``app.js``, ``app.css``; Chart.js vendored in ``static/vendor``);
- ``GET /api/whoami``: the caller's role (``viewer`` or ``admin``) and whether actions are on;
- ``GET /api/runs``: every run under the root with status, progress, ETA and last metrics;
- ``GET /api/runs/metrics?id=RUN&offset=B``: the metrics rows written since byte ``B`` (the page follows a
  growing ``metrics.jsonl`` this way, without a reload);
- ``GET /api/runs/report?id=RUN``: the run's report as HTML (the page shows it in a sandboxed frame: no scripts);
- ``GET /api/loop``: the registry (versions, parents, data hashes, gate results, decisions), what the server
  serves now, the audit log;
- ``GET /api/feedback?kind=&version=&since=&until=&limit=&offset=`` and ``GET /api/feedback/summary``;
- ``POST /api/loop/serve`` ``{version, reason}``: promote or roll back (admin key only, with ``actions`` on),
  through :func:`posttrain.loop.run.serve_version`, the function ``posttrain rollback`` calls: the same registry
  checks (only versions that passed their gates), the same audit lines (``via: ui``), the same server switch.

Bad requests get 4xx with a message naming the field, never a 500.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.errors import PosttrainError
from posttrain.feedback.store import KINDS, FeedbackStore
from posttrain.loop.registry import Registry
from posttrain.serve.app import BodyLimit
from posttrain.ui import runs

if TYPE_CHECKING:
    from posttrain.commands.ui import UIConfig

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 16 * 1024
AUDIT_SHOWN = 500
# The page: scripts, styles and frames only from this server; data: images (Chart.js exports, reports' plots).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class UIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass
class Access:
    """Who may read and who may act. ``view_keys`` None: reading is open (loopback only, no key configured)."""

    view_keys: list[str] | None
    admin_keys: list[str]
    actions: bool

    @staticmethod
    def _match(key: str | None, keys: list[str]) -> bool:
        return key is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)

    def role(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else None
        if self._match(key, self.admin_keys):
            return "admin"
        if self.view_keys is None or self._match(key, self.view_keys):
            return "viewer"
        return None

    def viewer(self, request: Request) -> str:
        role = self.role(request)
        if role is None:
            raise UIError(401, "missing or wrong key: send Authorization: Bearer <key> (an API or admin key)")
        return role

    def admin(self, request: Request) -> None:
        role = self.viewer(request)
        if not self.actions:
            raise UIError(403, "actions are off: this dashboard is read-only (start it with --actions and an admin key)")
        if role != "admin":
            raise UIError(403, "promote and rollback need the admin key; this key may only read")


def _day(text: str | None, field: str, end: bool = False) -> float | None:
    """``YYYY-MM-DD`` (UTC) as Unix seconds; ``end`` gives the day's end (the next midnight)."""
    if text in (None, ""):
        return None
    try:
        day = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise UIError(400, f"{field}: expected a date YYYY-MM-DD, got {text!r}") from None
    return (day + dt.timedelta(days=1 if end else 0)).timestamp()


def _int(text: str | None, field: str, default: int, lo: int, hi: int) -> int:
    if text in (None, ""):
        return default
    try:
        value = int(text)
    except ValueError:
        raise UIError(400, f"{field}: expected an integer, got {text!r}") from None
    if not lo <= value <= hi:
        raise UIError(400, f"{field}: expected {lo}..{hi}, got {value}")
    return value


def satisfaction(kind: str, value) -> float | None:
    """One feedback item as a 0..1 satisfaction score: thumbs up 1, down 0; a rating r of 1..5 as (r - 1) / 4; a
    correction 0 (the user had to write the answer they wanted). A preference ranks two answers without saying
    whether either was good: not scored (None)."""
    if kind == "thumbs":
        return 1.0 if value == "up" else 0.0
    if kind == "rating" and isinstance(value, (int, float)):
        return (float(value) - 1.0) / 4.0
    if kind == "correction":
        return 0.0
    return None


BUCKETS = (60, 600, 3600, 6 * 3600, 86400, 7 * 86400)


def satisfaction_trend(items: list[dict], max_points: int = 60) -> dict:
    """Mean satisfaction per version per time bucket; the bucket is the smallest of BUCKETS giving at most
    ``max_points`` buckets over the span of the data."""
    scored = [(i["version"], i["created"], s) for i in items if (s := satisfaction(i["kind"], i["value"])) is not None]
    if not scored:
        return {"bucket_s": None, "series": {}}
    span = max(c for _, c, _ in scored) - min(c for _, c, _ in scored)
    bucket = next((b for b in BUCKETS if span / b <= max_points), BUCKETS[-1])
    sums: dict[str, dict[int, list[float]]] = {}
    for version, created, score in scored:
        cell = sums.setdefault(version, {}).setdefault(int(created // bucket) * bucket, [0.0, 0])
        cell[0] += score
        cell[1] += 1
    series = {v: [{"t": t, "satisfaction": s / n, "n": n} for t, (s, n) in sorted(cells.items())]
              for v, cells in sums.items()}
    return {"bucket_s": bucket, "series": series}


def _feedback_item(row: dict) -> dict:
    prompt = next((m.get("content", "") for m in reversed(row["messages"]) if m.get("role") == "user"), "")
    return {"id": row["id"], "created": row["created"], "kind": row["kind"], "value": row["value"],
            "comment": row["comment"], "version": row["version"], "model": row["model"], "prompt": prompt,
            "response": row["response"], "other_response": (row["other"] or {}).get("response"),
            "satisfaction": satisfaction(row["kind"], row["value"])}


def create_app(cfg: UIConfig, access: Access, loop_cfg=None) -> FastAPI:
    """The dashboard app. ``loop_cfg``: the :class:`~posttrain.loop.run.LoopConfig` actions switch with (its
    registry, server_url, served_model and admin key variable); None when no registry is configured."""
    root = Path(cfg.root)
    app = FastAPI(title="posttrain ui", docs_url=None, redoc_url=None, openapi_url=None)
    store: list[FeedbackStore] = []  # opened on first use: the database may appear after the dashboard starts

    def feedback_store() -> FeedbackStore:
        if not cfg.db:
            raise UIError(404, "no feedback database configured (start the dashboard with --db URL or a loop config)")
        if not store:
            url = cfg.db
            if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
                raise UIError(404, f"{url}: no feedback database yet (the server creates it on its first request)")
            try:
                store.append(FeedbackStore(url))
            except (ValueError, PosttrainError) as e:
                raise UIError(404, f"feedback database: {e}") from None
        return store[0]

    @app.exception_handler(UIError)
    async def _ui_error(_request, e: UIError):
        return JSONResponse({"error": {"message": e.message}}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return JSONResponse({"error": {"message": str(e.detail)}}, status_code=e.status_code)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/whoami")
    async def whoami(request: Request):
        role = access.viewer(request)
        return {"role": role, "actions": access.actions and bool(access.admin_keys), "root": str(root.resolve()),
                "registry": bool(loop_cfg), "db": bool(cfg.db), "poll_s": cfg.poll_s}

    # -- runs ----------------------------------------------------------------------------------------------
    @app.get("/api/runs")
    async def list_runs(request: Request):
        access.viewer(request)
        return {"root": str(root.resolve()), "runs": await run_in_threadpool(runs.list_runs, root), "now": time.time()}

    @app.get("/api/runs/metrics")
    async def metrics(request: Request, id: str = "", offset: str | None = None):
        access.viewer(request)
        start = _int(offset, "offset", 0, 0, 1 << 50)
        try:
            return await run_in_threadpool(runs.read_metrics, root, id, start)
        except runs.NotFound as e:
            raise UIError(404, str(e)) from None

    @app.get("/api/runs/report")
    async def report(request: Request, id: str = ""):
        access.viewer(request)
        try:
            html = await run_in_threadpool(runs.render_report, root, id)
        except runs.NotFound as e:
            raise UIError(404, str(e)) from None
        # never run as this page's origin, even if opened directly: a report holds model outputs
        return HTMLResponse(html, headers={"Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; "
                                                                      "style-src 'unsafe-inline'"})

    # -- the loop ------------------------------------------------------------------------------------------
    def loop_view() -> dict:
        if loop_cfg is None:
            return {"configured": False}
        if not Path(loop_cfg.registry, "registry.json").is_file():
            return {"configured": True, "registry": str(loop_cfg.registry), "versions": [], "audit": [],
                    "served_model": loop_cfg.served_model, "message": "no registry.json yet (run `posttrain loop`)"}
        registry = Registry(loop_cfg.registry)
        versions = sorted(registry.versions.values(), key=lambda v: v.get("created", 0))
        servable = {v["id"]: registry.servable(v["id"])[0] for v in versions}
        out = {"configured": True, "registry": str(Path(loop_cfg.registry).resolve()), "serving": registry.serving,
               "pending": registry.pending, "served_model": loop_cfg.served_model,
               "versions": [{**v, "servable": servable[v["id"]]} for v in versions],
               "audit": registry.audit()[-AUDIT_SHOWN:], "server_url": loop_cfg.server_url, "server": None}
        if loop_cfg.server_url:
            import httpx

            key = (access.admin_keys or access.view_keys or [None])[0]  # the server's keys (an admin key reads too)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            try:
                r = httpx.get(loop_cfg.server_url.rstrip("/") + "/v1/models", headers=headers, timeout=5)
                out["server"] = ({"models": [{"id": m["id"], "version": m.get("version")} for m in r.json()["data"]]}
                                 if r.status_code == 200 else {"error": f"HTTP {r.status_code}: {r.text[:200]}"})
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                out["server"] = {"error": f"could not read {loop_cfg.server_url}/v1/models: {e}"}
        return out

    @app.get("/api/loop")
    async def loop(request: Request):
        access.viewer(request)
        try:
            return await run_in_threadpool(loop_view)
        except PosttrainError as e:
            raise UIError(409, str(e)) from None

    @app.post("/api/loop/serve")
    async def serve_version(request: Request):
        access.admin(request)
        if loop_cfg is None:
            raise UIError(404, "no registry configured (start the dashboard with --registry DIR or a loop config)")
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise UIError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict) or not isinstance(body.get("version"), str) or not body["version"]:
            raise UIError(400, "version: expected a version id string, e.g. \"v1\"")
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 1000:
            raise UIError(400, "reason: expected a string of at most 1000 characters")
        from posttrain.loop.run import serve_version

        def act() -> str:
            registry = Registry(loop_cfg.registry)
            if body["version"] not in registry.versions:
                raise UIError(404, f"version {body['version']!r} is not in the registry {registry.root}")
            try:
                return serve_version(loop_cfg, registry, body["version"], reason, via="ui")
            except PosttrainError as e:
                # recorded as pending: the registry accepted it and the server switch failed (the next loop cycle
                # or rollback retries it); otherwise the registry refused the version (not gated, rejected)
                registry.reload()
                switch_failed = (registry.pending or {}).get("version") == body["version"]
                raise UIError(502 if switch_failed else 409, str(e)) from None

        message = await run_in_threadpool(act)
        return {"ok": True, "message": message}

    # -- feedback ------------------------------------------------------------------------------------------
    @app.get("/api/feedback")
    async def feedback(request: Request, kind: str | None = None, version: str | None = None, since: str | None = None,
                       until: str | None = None, limit: str | None = None, offset: str | None = None):
        access.viewer(request)
        if kind not in (None, "") and kind not in KINDS:
            raise UIError(400, f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        args = {"kind": kind or None, "version": version or None, "since": _day(since, "since"),
                "until": _day(until, "until", end=True), "limit": _int(limit, "limit", 50, 1, 500),
                "offset": _int(offset, "offset", 0, 0, 1 << 40)}
        total, rows = await run_in_threadpool(lambda: feedback_store().query_feedback(**args))
        return {"total": total, "items": [_feedback_item(r) for r in rows]}

    @app.get("/api/feedback/summary")
    async def feedback_summary(request: Request):
        access.viewer(request)

        def summary() -> dict:
            s = feedback_store()
            versions: dict[str, dict] = {}
            for c in s.feedback_counts():
                v = versions.setdefault(c["version"], {"version": c["version"], "total": 0, "thumbs_up": 0,
                                                       "thumbs_down": 0, "ratings": {}, "preference": 0,
                                                       "correction": 0, "score_sum": 0.0, "scored": 0})
                v["total"] += c["n"]
                if c["kind"] == "thumbs":
                    v["thumbs_up" if c["value"] == "up" else "thumbs_down"] += c["n"]
                elif c["kind"] == "rating":
                    v["ratings"][str(c["value"])] = v["ratings"].get(str(c["value"]), 0) + c["n"]
                else:
                    v[c["kind"]] += c["n"]
                score = satisfaction(c["kind"], c["value"])
                if score is not None:
                    v["score_sum"] += score * c["n"]
                    v["scored"] += c["n"]
            for v in versions.values():
                v["satisfaction"] = v.pop("score_sum") / v["scored"] if v["scored"] else None
            return {"versions": sorted(versions.values(), key=lambda v: (len(v["version"]), v["version"])),
                    "trend": satisfaction_trend(list(s.iter_scored())), "kinds": list(KINDS)}

        return await run_in_threadpool(summary)

    return BodyLimit(app, MAX_BODY_BYTES)
