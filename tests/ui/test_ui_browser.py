"""`posttrain ui` in a real browser: headless Chromium from Debian's packages (/usr/bin/chromium), driven by
Playwright, against the dashboard and a real `posttrain serve` on loopback (tiny model, tiny registry).

What is checked is what a person sees: the runs table lists the runs; a finished SFT run's loss chart has one point
per logged step; a run in progress grows on the page without a reload; a report renders in its sandboxed frame;
promote and rollback clicked with the admin key change what the server's ``/v1/models`` reports; a user key sees
no buttons and is refused if it posts anyway; feedback is listed and filtered. Screenshots are written to
``$POSTTRAIN_TEST_ARTIFACTS/ui`` (default ``build/test-artifacts/ui``).

Skipped when Chromium or Playwright is missing, except under CI (``CI=true``), where that is a failure: `make
test` installs both (`make browser`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from posttrain.commands.ui import UIConfig
from posttrain.feedback.store import FeedbackStore
from posttrain.loop.registry import Registry
from posttrain.ui.app import Access, create_app
from tests import ROOT_DIR

CHROMIUM = "/usr/bin/chromium"
ADMIN = "ui-admin-key"
USER = "ui-user-key"
ARTIFACTS = Path(os.environ.get("POSTTRAIN_TEST_ARTIFACTS", ROOT_DIR / "build" / "test-artifacts")) / "ui"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests cannot run under CI: {why} (`make browser` installs it)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install -e '.[dev]')")
    _need(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (Debian package chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.set_default_timeout(20_000)
    yield p
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


class Uvicorn:
    """An ASGI app on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


def _ui(root: Path, access: Access | None = None, loop_cfg=None, db: str | None = None) -> Uvicorn:
    cfg = UIConfig(root=str(root), db=db, poll_s=0.5)
    return Uvicorn(create_app(cfg, access or Access(view_keys=None, admin_keys=[], actions=False), loop_cfg))


def _points(page, chart: str, dataset: int = 0) -> int:
    return page.evaluate("""([name, i]) => { const c = Chart.getChart(document.querySelector(`canvas[data-chart="${name}"]`));
        return c && c.data.datasets.length > i ? c.data.datasets[i].data.length : -1; }""", [chart, dataset])


def _wait_points(page, chart: str, n: int, dataset: int = 0) -> None:
    page.wait_for_function("""([name, i, n]) => { const c = Chart.getChart(document.querySelector(`canvas[data-chart="${name}"]`));
        return c && c.data.datasets.length > i && c.data.datasets[i].data.length === n; }""", arg=[chart, dataset, n])


# ------------------------------------------------------------------------------------------ runs and reports
def test_runs_page_lists_runs_charts_every_step_and_follows_a_live_run(page, tmp_path, tiny_model_dir):
    from tests.engine.test_engine import run_sft

    root = tmp_path / "runs"
    run_sft(tiny_model_dir, root / "sft-tiny", "max_steps=6", "batch_size=2")
    status = json.loads((root / "sft-tiny" / "run.json").read_text())
    assert (status["status"], status["total_steps"], status["objective"]) == ("finished", 6, "SFTObjective")
    live = root / "live"
    live.mkdir()
    rows = [{"step": s, "train/loss": 3.0 - 0.2 * s, "train/lr": 1e-4, "train/units_per_s": 100.0 + s,
             "train/step_seconds": 1.5} for s in range(1, 11)]
    (live / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (live / "run.json").write_text(json.dumps({"status": "running", "objective": "SFTObjective", "total_steps": 10,
                                               "start_step": 0, "started": time.time(), "pid": os.getpid(),
                                               "host": socket.gethostname()}))
    pipe = root / "pipeline-x"
    pipe.mkdir()
    (pipe / "summary.json").write_text(json.dumps({"stages": [{"name": "sft"}], "base": {}, "stopped_at": None}))
    (pipe / "report.md").write_text("# Pipeline report\n\n| stage | gate |\n|---|---|\n| sft | pass |\n")
    server = _ui(root)
    try:
        page.goto(server.url)
        page.wait_for_selector('tr[data-run="sft-tiny"]')
        assert page.locator("#runs-table tbody tr").count() == 3
        assert "finished" in page.locator('tr[data-run="sft-tiny"]').inner_text()
        assert "6/6" in page.locator('tr[data-run="sft-tiny"]').inner_text()
        page.click('tr[data-run="sft-tiny"]')
        _wait_points(page, "loss", 6)  # one point per logged step of the real run
        _wait_points(page, "lr", 6)
        page.click('tr[data-run="live"]')
        _wait_points(page, "loss", 3)
        assert "running" in page.locator('tr[data-run="live"]').inner_text()
        page.evaluate("() => { window.__sameDocument = true; }")
        with (live / "metrics.jsonl").open("a") as f:  # the trainer logs two more steps
            f.write("".join(json.dumps(r) + "\n" for r in rows[3:5]))
        _wait_points(page, "loss", 5)
        page.wait_for_function("() => document.querySelector('tr[data-run=\"live\"]').innerText.includes('5/10')")
        assert page.evaluate("() => window.__sameDocument === true")  # updated in place, no reload
        page.check('input[aria-label="compare sft-tiny"]')  # overlay: both runs on every chart
        page.wait_for_function("() => Chart.getChart(document.querySelector('canvas[data-chart=\"loss\"]')).data.datasets.length === 2")
        _shot(page, "runs")

        page.click('tr[data-run="pipeline-x"]')  # a pipeline is its report, in place
        page.frame_locator("#run-inline-report").locator("td", has_text="pass").wait_for()
        page.click('a[data-tab="reports"]')
        page.click('li[data-report="pipeline-x"]')
        page.frame_locator("#report-frame").locator("h1", has_text="Pipeline report").wait_for()
        _shot(page, "reports")
    finally:
        page.goto("about:blank")  # stop the page's polling before its server goes
        server.close()


# ------------------------------------------------------------------------------------------ the loop
@pytest.fixture()
def served_loop(tmp_path, tiny_model_dir, monkeypatch):
    """A real `posttrain serve` on the tiny model with a registry: v0 retired, v1 serving, v2 rejected, v3 approved
    but never served; a SQLite feedback store with answers and feedback from two versions."""
    from posttrain.commands.serve import ServeConfig, ServeSamplingSection
    from posttrain.loop.run import LoopConfig
    from posttrain.serve.app import create_app as create_server
    from posttrain.serve.models import ModelRegistry
    from tests.serving import Server, save_lora

    adapters = [save_lora(tiny_model_dir, tmp_path / f"a{i}", i + 1) for i in range(4)]
    reg = Registry(tmp_path / "registry")
    for i, a in enumerate(adapters):
        reg.register(a, parent=f"v{i - 1}" if i else None, data={"kto.jsonl": f"{i:x}" * 64})
    reg.decide("v0", True, ["initial version"], {})
    reg.confirm("v0", "test")
    reg.decide("v1", True, ["pass: reward 0.120 -> 0.410 (gain +0.290, needs > +0.000)",
                            "pass: perplexity 18.0 -> 18.3 (+1.7%, at most +5.0%)"],
               {"serving": {"reward": 0.12, "perplexity": 18.0}, "candidate": {"reward": 0.41, "perplexity": 18.3}})
    reg.confirm("v1", "test")
    reg.decide("v2", False, ["pass: reward 0.410 -> 0.520", "FAIL: perplexity 18.3 -> 24.9 (+36.1%, at most +5.0%)"], {})
    reg.decide("v3", True, ["pass: reward 0.410 -> 0.450"], {})
    with reg.transaction():  # v3's switch was superseded: v1 still serves
        reg.pending = None
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = ServeConfig(model=str(tiny_model_dir), model_name="tiny", registry=str(reg.root), registry_model="assistant",
                      sampling=ServeSamplingSection(max_tokens=6), db=db)
    models = ModelRegistry.load(cfg)
    models.start()
    store = FeedbackStore(db)
    srv = Server(create_server(models, store, cfg, [USER], [ADMIN]), models, store, cfg)
    for i, fb in enumerate(({"thumbs": "up"}, {"thumbs": "down", "comment": "too short"}, {"rating": 4})):
        r = srv.post("/v1/chat/completions", {"model": "assistant", "messages": [{"role": "user", "content": f"hi {i}"}]},
                     key=USER)
        assert r.status_code == 200, r.text
        assert srv.post("/v1/feedback", {"completion_id": r.json()["id"], **fb}, key=USER).status_code == 200
    monkeypatch.setenv("POSTTRAIN_ADMIN_KEY", ADMIN)  # what the switch sends the server (the loop's admin_key_env)
    loop_cfg = LoopConfig(registry=str(reg.root), served_model="assistant", server_url=srv.url)
    yield srv, reg, loop_cfg, db
    srv.close()
    store.close()
    torch.set_num_threads(threads)


def _served(srv) -> str | None:
    data = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {USER}"}, timeout=30).json()["data"]
    return {m["id"]: m.get("version") for m in data}["assistant"]


def _use_key(page, key: str) -> None:
    page.fill("#key", key)
    page.click("#key-form button")


def test_promote_and_rollback_switch_the_server_and_a_user_key_cannot(page, tmp_path, served_loop):
    srv, reg, loop_cfg, db = served_loop
    (tmp_path / "runs").mkdir()
    access = Access(view_keys=[USER, ADMIN], admin_keys=[ADMIN], actions=True)
    server = _ui(tmp_path / "runs", access, loop_cfg, db)
    try:
        assert _served(srv) == "v1"
        page.goto(server.url + "/#loop")
        page.wait_for_function("() => document.querySelector('#notice').innerText.includes('needs a key')")
        _use_key(page, USER)
        page.wait_for_selector('.version[data-version="v3"]')
        assert page.locator("#role").inner_text() == "viewer"
        assert page.locator("button[data-action]").count() == 0  # a user key sees no actions...
        status = page.evaluate("""async (key) => (await fetch('/api/loop/serve', {method: 'POST',
            headers: {'Authorization': 'Bearer ' + key, 'Content-Type': 'application/json'},
            body: JSON.stringify({version: 'v0'})})).status""", USER)
        assert status == 403 and _served(srv) == "v1"  # ...and is refused if it posts anyway
        assert "FAIL: perplexity" in page.locator('.version[data-version="v2"]').inner_text()
        assert page.locator('[data-server-model="assistant"] .big').inner_text() == "v1"

        _use_key(page, ADMIN)
        page.wait_for_selector('button[data-action="promote"][data-version="v3"]')
        assert page.locator('button[data-version="v2"]').count() == 0  # rejected: never offered
        page.click('button[data-action="promote"][data-version="v3"]')
        page.fill("#confirm-reason", "v3 passed its gates; its switch was superseded")
        page.click("#confirm-ok")
        page.wait_for_function("() => document.querySelector('[data-server-model=\"assistant\"] .big').innerText === 'v3'")
        assert _served(srv) == "v3"
        page.click('button[data-action="rollback"][data-version="v1"]')
        page.fill("#confirm-reason", "v3 answers worse in production")
        page.click("#confirm-ok")
        page.wait_for_function("() => document.querySelector('[data-server-model=\"assistant\"] .big').innerText === 'v1'")
        assert _served(srv) == "v1"
        audit = [(e["event"], e["version"], e.get("via")) for e in Registry(reg.root).audit()[-4:]]
        assert audit == [("promote", "v3", "ui"), ("serving", "v3", None), ("rollback", "v1", "ui"), ("serving", "v1", None)]
        page.wait_for_function("() => document.querySelector('#audit tbody tr').innerText.includes('serving')")
        _shot(page, "loop")

        page.click('a[data-tab="feedback"]')
        page.wait_for_selector('tr[data-fb-version="v1"]')
        page.wait_for_function("() => document.querySelectorAll('#fb-table tbody tr').length === 3")
        assert "too short" in page.locator("#fb-table").inner_text()
        page.select_option('#fb-filters select[name="kind"]', "thumbs")
        page.click('#fb-filters button[type="submit"]')
        page.wait_for_function("() => document.querySelectorAll('#fb-table tbody tr').length === 2")
        _wait_points(page, "satisfaction", 1)
        _shot(page, "feedback")
    finally:
        page.goto("about:blank")  # stop the page's polling before its server goes
        server.close()
