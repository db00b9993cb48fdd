"""`posttrain ui`'s JSON and files, without a browser: run discovery and status, growing metrics, reports in a
sandbox, keys and roles, promote/rollback through the registry exactly as `posttrain rollback`, feedback browsing
and the satisfaction numbers (hand-computed)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from posttrain.commands.ui import UIConfig, resolve
from posttrain.errors import ConfigError
from posttrain.feedback.store import FeedbackStore
from posttrain.loop.registry import Registry
from posttrain.ui import runs
from posttrain.ui.app import Access, create_app, satisfaction_trend

VIEW, ADMIN = "view-key", "admin-key"


def _jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _status(folder: Path, **fields) -> None:
    (folder / "run.json").write_text(json.dumps(fields))


@pytest.fixture()
def root(tmp_path):
    """A runs folder with one of each kind of run, and folders that are not runs."""
    r = tmp_path / "runs"
    live = r / "live"
    _jsonl(live / "metrics.jsonl", [{"step": s, "train/loss": 2.0 - 0.1 * s, "train/step_seconds": 2.0} for s in (1, 2, 3)])
    _status(live, status="running", objective="DPOObjective", total_steps=10, start_step=0, started=time.time(),
            pid=os.getpid(), host=socket.gethostname())
    dead = r / "dead"
    _jsonl(dead / "metrics.jsonl", [{"step": 1, "train/loss": 1.0}])
    _status(dead, status="running", objective="SFTObjective", total_steps=5, pid=2 ** 22 + 12345,
            host=socket.gethostname())
    old = r / "old"  # from before run.json: finished because its weights are saved
    _jsonl(old / "metrics.jsonl", [{"step": 1, "train/loss": 1.0}])
    (old / "adapter_model.safetensors").write_bytes(b"x")
    (old / "posttrain_config.json").write_text(json.dumps({"max_steps": 1, "beta": 0.1}))
    (old / "checkpoints" / "step-1").mkdir(parents=True)
    _jsonl(old / "checkpoints" / "step-1" / "metrics.jsonl", [{"step": 1}])  # not a run: checkpoints are skipped
    pipe = r / "pipe"
    pipe.mkdir()
    (pipe / "summary.json").write_text(json.dumps({"title": "t", "stopped_at": "dpo", "base": {},
                                                   "stages": [{"name": "sft"}, {"name": "dpo"}]}))
    (pipe / "report.md").write_text("# Pipeline\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![plot](report.png)\n"
                                    "<script>alert(1)</script>\n")
    (pipe / "report.png").write_bytes(b"\x89PNG fake")
    (r / "cmp").mkdir()
    (r / "cmp" / "compare.json").write_text("{}")
    (r / "cmp" / "compare.md").write_text("# Compare\n")
    (r / "audit").mkdir()
    (r / "audit" / "summary.json").write_text(json.dumps({"rows": 12}))
    (r / "audit" / "report.md").write_text("# Audit\n")
    (r / "audit" / "report.html").write_text("<html><body>audit html</body></html>")
    (tmp_path / "secret").mkdir()
    _jsonl(tmp_path / "secret" / "metrics.jsonl", [{"step": 1, "train/loss": 9.0}])  # outside the root
    return r


def _client(root: Path, access: Access | None = None, loop_cfg=None, db: str | None = None) -> TestClient:
    cfg = UIConfig(root=str(root), db=db)
    return TestClient(create_app(cfg, access or Access(view_keys=None, admin_keys=[], actions=False), loop_cfg))


def test_runs_are_found_with_their_kind_status_progress_and_eta(root):
    found = dict(runs.find_runs(root))
    assert found == {"audit": "audit", "cmp": "compare", "dead": "train", "live": "train", "old": "train",
                     "pipe": "pipeline"}
    listed = {r["id"]: r for r in _client(root).get("/api/runs").json()["runs"]}
    live = listed["live"]
    assert (live["status"], live["stage"], live["step"], live["total_steps"]) == ("running", "dpo", 3, 10)
    assert live["eta_s"] == pytest.approx(7 * 2.0)  # 7 steps left at the mean logged step time
    assert live["last"]["train/loss"] == pytest.approx(1.7)
    assert listed["dead"]["status"] == "interrupted"  # "running", but its process is gone
    assert (listed["old"]["status"], listed["old"]["stage"], listed["old"]["total_steps"]) == ("finished", "dpo", 1)
    assert listed["pipe"]["status"] == "gate failed" and listed["pipe"]["stages"] == ["sft", "dpo"]
    assert all(listed[k]["report"] for k in ("pipe", "cmp", "audit")) and not listed["live"]["report"]


def test_metrics_are_read_incrementally_as_the_file_grows(root):
    c = _client(root)
    m = c.get("/api/runs/metrics", params={"id": "live"}).json()
    assert [r["step"] for r in m["rows"]] == [1, 2, 3] and not m["reset"] and not m["more"]
    path = root / "live" / "metrics.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"step": 4, "train/loss": 1.6, "eval/loss": "nan"}) + "\n" + '{"step": 5, "train/lo')
    m2 = c.get("/api/runs/metrics", params={"id": "live", "offset": m["offset"]}).json()
    assert m2["rows"] == [{"step": 4, "train/loss": 1.6}]  # non-finite values dropped; the partial line waits
    assert m2["offset"] == path.read_bytes().rfind(b"\n") + 1
    with path.open("a") as f:
        f.write('ss": 1.5}\n')
    assert c.get("/api/runs/metrics", params={"id": "live", "offset": m2["offset"]}).json()["rows"] == [
        {"step": 5, "train/loss": 1.5}]
    _jsonl(path, [{"step": 1, "train/loss": 3.0}])  # a resumed run rewrote its log: shorter than the offset
    m3 = c.get("/api/runs/metrics", params={"id": "live", "offset": m2["offset"] + 10}).json()
    assert m3["reset"] and m3["rows"] == [{"step": 1, "train/loss": 3.0}]


def test_a_run_outside_the_root_or_unknown_is_404_and_bad_offsets_400(root):
    c = _client(root)
    for bad in ("../secret", "/etc", "nope", "old/checkpoints/step-1/../../..", "live/../../secret"):
        r = c.get("/api/runs/metrics", params={"id": bad})
        assert r.status_code == 404, (bad, r.text)
        assert "error" in r.json()
    assert c.get("/api/runs/metrics", params={"id": "live", "offset": "x"}).status_code == 400
    assert c.get("/api/runs/metrics", params={"id": "live", "offset": "-1"}).status_code == 400
    assert c.get("/api/runs/report", params={"id": "live"}).status_code == 404  # no report


def test_reports_are_rendered_with_plots_inlined_and_served_sandboxed(root):
    c = _client(root)
    r = c.get("/api/runs/report", params={"id": "pipe"})
    assert r.status_code == 200 and "<table>" in r.text and "<td>1</td>" in r.text
    assert "data:image/png;base64," in r.text and "report.png)" not in r.text
    assert r.headers["content-security-policy"].startswith("sandbox;")  # the <script> in it can never run
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "audit html" in c.get("/api/runs/report", params={"id": "audit"}).text  # its own self-contained HTML
    assert "<h1>Compare</h1>" in c.get("/api/runs/report", params={"id": "cmp"}).text
    page = c.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert c.get("/static/vendor/chart.umd.min.js").status_code == 200


def test_the_vendored_chart_library_is_the_pinned_file_with_its_licence():
    vendor = Path(runs.__file__).parent / "static" / "vendor"
    readme = (vendor / "README.md").read_text()
    digest = hashlib.sha256((vendor / "chart.umd.min.js").read_bytes()).hexdigest()
    assert digest in readme and "MIT" in (vendor / "chart.js-LICENSE.md").read_text()
    assert "Chart.js v4.6.2" in (vendor / "chart.umd.min.js").read_text()[:200] and "4.6.2" in readme


# ------------------------------------------------------------------------------------------ keys and actions
def _adapter(path: Path) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return str(path)


@pytest.fixture()
def registry(tmp_path):
    """v0 served then retired, v1 serving, v2 rejected, v3 approved but superseded (never served)."""
    reg = Registry(tmp_path / "registry")
    for i in range(4):
        reg.register(_adapter(tmp_path / f"a{i}"), parent=f"v{i - 1}" if i else None, data={"kto.jsonl": f"{i}" * 64})
    reg.decide("v0", True, ["initial version"], {})
    reg.confirm("v0", "test")
    reg.decide("v1", True, ["pass: reward 0.1 -> 0.4"], {"serving": {"reward": 0.1}, "candidate": {"reward": 0.4}})
    reg.confirm("v1", "test")
    reg.decide("v2", False, ["FAIL: perplexity +12%"], {})
    reg.decide("v3", True, ["pass: reward"], {})
    reg.confirm("v1", "test")  # v3's switch never happened: v1 still serves
    with reg.transaction():
        reg.pending = None
    return reg


def _loop_cfg(registry):
    from posttrain.loop.run import LoopConfig

    return LoopConfig(registry=str(registry.root), served_model="assistant", server_url=None)


def test_reading_needs_a_key_when_keys_are_set_and_acting_needs_the_admin_key(root, registry):
    access = Access(view_keys=[VIEW, ADMIN], admin_keys=[ADMIN], actions=True)
    c = _client(root, access, _loop_cfg(registry))
    assert c.get("/api/runs").status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/", headers={}).status_code == 200  # the page itself holds no data
    view = {"Authorization": f"Bearer {VIEW}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert c.get("/api/whoami", headers=view).json()["role"] == "viewer"
    assert c.get("/api/whoami", headers=admin).json()["role"] == "admin"
    loop = c.get("/api/loop", headers=view).json()
    assert [v["id"] for v in loop["versions"]] == ["v0", "v1", "v2", "v3"] and loop["serving"] == "v1"
    assert [v["servable"] for v in loop["versions"]] == [True, True, False, True]
    assert loop["versions"][1]["reasons"] == ["pass: reward 0.1 -> 0.4"]
    assert loop["versions"][1]["data"] == {"kto.jsonl": "1" * 64}
    before = len(Registry(registry.root).audit())
    r = c.post("/api/loop/serve", json={"version": "v0", "reason": "x"}, headers=view)
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    assert c.post("/api/loop/serve", json={"version": "v0"}).status_code == 401
    assert len(Registry(registry.root).audit()) == before and Registry(registry.root).serving == "v1"

    r = c.post("/api/loop/serve", json={"version": "v0", "reason": "v1 answers worse"}, headers=admin)
    assert r.status_code == 200, r.text
    reg = Registry(registry.root)
    assert reg.serving == "v0" and reg.pending is None and reg.versions["v1"]["status"] == "retired"
    rollback, serving = reg.audit()[-2:]
    assert (rollback["event"], rollback["version"], rollback["via"], rollback["reason"], rollback["previous"]) == (
        "rollback", "v0", "ui", "v1 answers worse", "v1")
    assert (serving["event"], serving["version"]) == ("serving", "v0")
    r = c.post("/api/loop/serve", json={"version": "v3"}, headers=admin)  # approved, never served: a promotion
    assert r.status_code == 200 and Registry(registry.root).audit()[-2]["event"] == "promote"
    assert Registry(registry.root).serving == "v3"

    r = c.post("/api/loop/serve", json={"version": "v2"}, headers=admin)
    assert r.status_code == 409 and "rejected by the gates" in r.json()["error"]["message"]
    assert c.post("/api/loop/serve", json={"version": "v9"}, headers=admin).status_code == 404
    assert c.post("/api/loop/serve", json={"versio": "v0"}, headers=admin).status_code == 400
    assert c.post("/api/loop/serve", content=b"{", headers=admin).status_code == 400
    assert c.post("/api/loop/serve", content=b"x" * 20_000, headers=admin).status_code == 413
    assert Registry(registry.root).serving == "v3"


def test_actions_are_off_unless_enabled(root, registry):
    c = _client(root, Access(view_keys=[ADMIN], admin_keys=[ADMIN], actions=False), _loop_cfg(registry))
    r = c.post("/api/loop/serve", json={"version": "v0"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
    assert Registry(registry.root).serving == "v1"


def test_the_ui_and_the_cli_write_the_same_audit_lines(tmp_path, registry, monkeypatch, capsys):
    from posttrain.commands import rollback

    assert rollback.main(["v0", f"registry={registry.root}", "--reason", "by hand"]) == 0
    assert "rollback: assistant = v0" in capsys.readouterr().out
    cli = Registry(registry.root).audit()[-2]
    c = _client(tmp_path, Access(view_keys=[ADMIN], admin_keys=[ADMIN], actions=True), _loop_cfg(registry))
    assert c.post("/api/loop/serve", json={"version": "v1", "reason": "by hand"},
                  headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    ui = Registry(registry.root).audit()[-2]
    assert set(cli) == set(ui) and cli["via"] == "cli" and ui["via"] == "ui" and cli["event"] == ui["event"]


def test_config_is_checked_before_starting(tmp_path, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_API_KEY", raising=False)
    monkeypatch.delenv("POSTTRAIN_ADMIN_KEY", raising=False)
    with pytest.raises(ConfigError, match="not loopback"):
        resolve(UIConfig(root=str(tmp_path), host="0.0.0.0"))
    with pytest.raises(ConfigError, match="no such folder"):
        resolve(UIConfig(root=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="admin key"):
        resolve(UIConfig(root=str(tmp_path), registry=str(tmp_path), actions=True))
    access, loop_cfg = resolve(UIConfig(root=str(tmp_path)))
    assert access.view_keys is None and loop_cfg is None and not access.actions
    monkeypatch.setenv("POSTTRAIN_ADMIN_KEY", "a1,a2")
    monkeypatch.setenv("POSTTRAIN_API_KEY", "u1")
    with pytest.raises(ConfigError, match="registry"):
        resolve(UIConfig(root=str(tmp_path), actions=True))
    access, loop_cfg = resolve(UIConfig(root=str(tmp_path), host="0.0.0.0", registry=str(tmp_path), actions=True))
    assert access.view_keys == ["u1", "a1", "a2"] and access.admin_keys == ["a1", "a2"] and loop_cfg.registry == str(tmp_path)
    monkeypatch.setenv("POSTTRAIN_API_KEY", "a2")
    with pytest.raises(ConfigError, match="also an API key"):
        resolve(UIConfig(root=str(tmp_path)))


# ------------------------------------------------------------------------------------------ feedback
@pytest.fixture()
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    store = FeedbackStore(url)
    day1 = 1_796_000_000.0  # 2026-11-30 UTC
    rows = [("c1", "v0", day1), ("c2", "v0", day1 + 60), ("c3", "v1", day1 + 86400), ("c4", "v1", day1 + 86400 + 5)]
    for cid, version, created in rows:
        store.log_completion(id=cid, model="assistant", version=version, messages=[{"role": "user", "content": f"q {cid}"}],
                             response=f"answer {cid}", sampling={}, created=created)
    fb = [("c1", "thumbs", "up"), ("c2", "thumbs", "down"), ("c2", "rating", 2), ("c3", "rating", 5),
          ("c4", "thumbs", "up"), ("c3", "preference", "c4"), ("c4", "correction", "better")]
    for i, (cid, kind, value) in enumerate(fb):
        store.add_feedback(completion_id=cid, kind=kind, value=value, comment="note" if i == 0 else None)
    with store._engine.begin() as conn:  # feedback times: the first three on day 1, the rest on day 2
        from sqlalchemy import text

        conn.execute(text("UPDATE feedback SET created = :t WHERE id <= 3"), {"t": day1 + 100})
        conn.execute(text("UPDATE feedback SET created = :t WHERE id > 3"), {"t": day1 + 86400 + 100})
    store.close()
    return url


def test_feedback_is_filtered_counted_and_scored(tmp_path, db):
    c = _client(tmp_path, db=db)
    page = c.get("/api/feedback").json()
    assert page["total"] == 7 and [i["id"] for i in page["items"]] == [7, 6, 5, 4, 3, 2, 1]  # newest first
    assert page["items"][-1]["prompt"] == "q c1" and page["items"][-1]["comment"] == "note"
    pref = next(i for i in page["items"] if i["kind"] == "preference")
    assert pref["response"] == "answer c3" and pref["other_response"] == "answer c4"
    assert c.get("/api/feedback", params={"kind": "thumbs"}).json()["total"] == 3
    assert c.get("/api/feedback", params={"version": "v1"}).json()["total"] == 4
    assert c.get("/api/feedback", params={"since": "2026-12-01"}).json()["total"] == 4
    assert c.get("/api/feedback", params={"until": "2026-11-30"}).json()["total"] == 3  # the whole day included
    two = c.get("/api/feedback", params={"limit": 2, "offset": 2}).json()
    assert two["total"] == 7 and [i["id"] for i in two["items"]] == [5, 4]
    for params, field in (({"kind": "stars"}, "kind"), ({"since": "yesterday"}, "since"), ({"limit": 0}, "limit")):
        r = c.get("/api/feedback", params=params)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(field)

    s = c.get("/api/feedback/summary").json()
    v0, v1 = s["versions"]
    assert (v0["version"], v0["total"], v0["thumbs_up"], v0["thumbs_down"], v0["ratings"]) == ("v0", 3, 1, 1, {"2": 1})
    assert v0["satisfaction"] == pytest.approx((1 + 0 + 0.25) / 3)  # up 1, down 0, rating 2 -> 1/4
    assert (v1["total"], v1["preference"], v1["correction"], v1["ratings"]) == (4, 1, 1, {"5": 1})
    assert v1["satisfaction"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)  # rating 5 -> 1, up -> 1, a correction -> 0
    assert s["trend"]["bucket_s"] == 3600 and set(s["trend"]["series"]) == {"v0", "v1"}
    assert [p["n"] for p in s["trend"]["series"]["v0"]] == [3]


def test_feedback_without_a_database_is_a_clear_404(tmp_path):
    r = _client(tmp_path).get("/api/feedback")
    assert r.status_code == 404 and "no feedback database" in r.json()["error"]["message"]
    r = _client(tmp_path, db=f"sqlite:///{tmp_path / 'none.db'}").get("/api/feedback/summary")
    assert r.status_code == 404 and "no feedback database yet" in r.json()["error"]["message"]


def test_satisfaction_trend_buckets_by_the_span_of_the_data():
    items = [{"version": "v0", "kind": "thumbs", "value": "up", "created": 0.0},
             {"version": "v0", "kind": "thumbs", "value": "down", "created": 30.0},
             {"version": "v1", "kind": "rating", "value": 4, "created": 90.0},
             {"version": "v1", "kind": "correction", "value": "x", "created": 95.0},
             {"version": "v1", "kind": "preference", "value": "c9", "created": 96.0}]
    trend = satisfaction_trend(items)
    assert trend["bucket_s"] == 60
    assert trend["series"] == {"v0": [{"t": 0, "satisfaction": 0.5, "n": 2}],
                               "v1": [{"t": 60, "satisfaction": 0.375, "n": 2}]}  # (0.75 + 0) / 2; preferences unscored
    assert satisfaction_trend([])["series"] == {}


def test_an_unreachable_server_is_a_502_and_the_switch_stays_pending(tmp_path, registry, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_ADMIN_KEY", ADMIN)
    loop_cfg = _loop_cfg(registry)
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        loop_cfg.server_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    c = _client(tmp_path, Access(view_keys=[ADMIN], admin_keys=[ADMIN], actions=True), loop_cfg)
    r = c.post("/api/loop/serve", json={"version": "v0", "reason": "x"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 502 and "could not reach the server" in r.json()["error"]["message"]
    reg = Registry(registry.root)
    assert reg.serving == "v1" and reg.pending["version"] == "v0"  # the next cycle or rollback finishes it
    assert [e["event"] for e in reg.audit()[-2:]] == ["rollback", "switch_failed"]
