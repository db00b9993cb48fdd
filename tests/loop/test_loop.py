"""`posttrain loop` / `rollback`: gates on hand-made numbers, the registry's rules, and whole cycles on a tiny
model whose outcome is fixed by construction (a gate that cannot pass rejects, gates that cannot fail promote)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from posttrain.errors import ConfigError, PosttrainError
from posttrain.loop.gates import GatesSection, check
from posttrain.loop.registry import Registry


# ------------------------------------------------------------------------------------------ gates
def test_gates_promote_only_when_every_gate_passes():
    g = GatesSection(prompts="p", rewards=[{"function": "x"}], min_reward_gain=0.02, max_perplexity_increase=0.05,
                     max_task_drop=0.05, max_length_change=0.5, max_duplicate_share=0.5)
    serving = {"reward": 0.50, "perplexity": 10.0, "task_accuracy": 0.80, "mean_words": 20.0, "duplicate_share": 0.0}
    good = {"reward": 0.60, "perplexity": 10.4, "task_accuracy": 0.78, "mean_words": 15.0, "duplicate_share": 0.1}
    ok, reasons = check(serving, good, g)
    assert ok and all(r.startswith("pass: ") for r in reasons) and len(reasons) == 5

    for change, needle in [({"reward": 0.51}, "held-out reward"),          # +0.01 is not > 0.02
                           ({"perplexity": 10.6}, "general perplexity"),     # +6% > 5%
                           ({"task_accuracy": 0.70}, "fixed-task accuracy"), # drop 0.10 > 0.05
                           ({"mean_words": 5.0}, "answer length"),           # -75%: a collapse
                           ({"duplicate_share": 0.9}, "duplicate answers")]:
        ok, reasons = check(serving, {**good, **change}, g)
        failed = [r for r in reasons if r.startswith("FAIL")]
        assert not ok and len(failed) == 1 and needle in failed[0], (change, reasons)


def test_gates_need_an_improvement_gate():
    ok, reasons = check({"perplexity": 10.0}, {"perplexity": 9.0}, GatesSection(general_data="g"))
    assert not ok and any("no improvement gate" in r for r in reasons)


def test_preference_accuracy_gate():
    g = GatesSection(preference_data="d", min_preference_gain=0.0)
    assert check({"preference_accuracy": 0.5}, {"preference_accuracy": 0.75}, g)[0]
    assert not check({"preference_accuracy": 0.5}, {"preference_accuracy": 0.5}, g)[0]


# ------------------------------------------------------------------------------------------ registry
def _adapter(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


def _promote(reg, vid, reasons=("pass",)):
    reg.decide(vid, True, list(reasons), {})
    reg.confirm(vid, "test")


def test_registry_promotes_rejects_rolls_back_and_audits(tmp_path):
    reg = Registry(tmp_path / "reg")
    v0 = reg.register(_adapter(tmp_path / "a0"), parent=None)
    _promote(reg, v0, ["initial"])
    v1 = reg.register(_adapter(tmp_path / "a1"), parent=v0, data={"kto.jsonl": "abc"})
    reg.decide(v1, True, ["pass: reward"], {"candidate": {"reward": 1}})
    assert reg.serving == v0 and reg.pending["version"] == v1 and reg.versions[v1]["status"] == "approved"
    reg.confirm(v1, "test")  # the server switched: phase two
    v2 = reg.register(_adapter(tmp_path / "a2"), parent=v1)
    reg.decide(v2, False, ["FAIL: perplexity"], {})
    assert reg.serving == v1 and reg.versions[v0]["status"] == "retired" and reg.versions[v2]["status"] == "rejected"
    with pytest.raises(PosttrainError, match="rejected by the gates"):
        reg.rollback(v2)
    with pytest.raises(PosttrainError, match="rejected by the gates"):
        reg.rollback(v2, "I insist", override=True)  # a rejected version never serves, override or not
    reg.rollback(v0, "v1 answers worse in production")
    reg.confirm(v0, "test")
    again = Registry(tmp_path / "reg")  # reloaded from disk
    assert again.serving == v0 and again.versions[v1]["status"] == "retired" and again.pending is None
    assert again.versions[v1]["data"] == {"kto.jsonl": "abc"} and again.versions[v1]["parent"] == v0
    events = [(e["event"], e["version"]) for e in again.audit()]
    assert events == [("register", "v0"), ("promote", "v0"), ("serving", "v0"), ("register", "v1"), ("promote", "v1"),
                      ("serving", "v1"), ("register", "v2"), ("reject", "v2"), ("rollback", "v0"), ("serving", "v0")]
    assert (tmp_path / "reg" / "versions" / "v1" / "adapter_config.json").is_file()  # a copy, not a link
    with pytest.raises(PosttrainError, match="not in the registry"):
        again.rollback("v9")


def test_rollback_serves_only_versions_that_passed_their_gates(tmp_path):
    """Finding 2: a registered but never gated candidate could be rolled back to."""
    reg = Registry(tmp_path / "reg")
    _promote(reg, reg.register(_adapter(tmp_path / "a0"), parent=None))
    v1 = reg.register(_adapter(tmp_path / "a1"), parent="v0")  # the loop crashed before its gates ran
    with pytest.raises(PosttrainError, match="never passed its gates"):
        reg.rollback(v1)
    assert reg.servable(v1)[0] is False and reg.serving == "v0" and reg.pending is None
    with pytest.raises(PosttrainError, match="needs --reason"):
        reg.rollback(v1, override=True)
    reg.rollback(v1, "gates broken, verified by hand", override=True)
    reg.confirm(v1, "test")
    assert reg.serving == v1 and [e["event"] for e in reg.audit()][-3:] == ["override", "promote", "serving"]
    with pytest.raises(PosttrainError, match="already decided"):
        reg.decide("v0", False, [], {})


def test_a_writer_with_an_old_copy_cannot_undo_another_writers_change(tmp_path):
    """Finding 5: the loop's save from an older in-memory copy used to overwrite an operator's rollback."""
    loop = Registry(tmp_path / "reg")
    _promote(loop, loop.register(_adapter(tmp_path / "a0"), parent=None))
    _promote(loop, loop.register(_adapter(tmp_path / "a1"), parent="v0"))
    operator = Registry(tmp_path / "reg")
    operator.rollback("v0", "bad answers")
    operator.confirm("v0", "test")
    assert loop.serving == "v1"  # the loop's snapshot is old...
    loop.update_state(last_feedback_id=7)  # ...and it writes
    on_disk = Registry(tmp_path / "reg")
    assert on_disk.serving == "v0" and on_disk.state["last_feedback_id"] == 7
    assert on_disk.audit()[-1]["event"] == "serving" and on_disk.audit()[-1]["version"] == "v0"
    assert not (tmp_path / "reg" / "registry.json.tmp").exists()


def _race_worker(root: str, role: str, rounds: int) -> None:
    reg = Registry(root)
    for i in range(rounds):
        if role == "operator":
            target = "v0" if i % 2 == 0 else "v1"
            reg.rollback(target, f"round {i}")
            reg.confirm(target, "operator")
        else:
            vid = reg.register(None, parent=reg.serving)
            reg.decide(vid, i % 3 != 0, ["raced"], {})
            if reg.pending and reg.pending["version"] == vid:
                reg.confirm(vid, "loop")
            reg.update_state(**{f"loop_{i}": i})


def test_two_processes_racing_rollback_and_promotion_agree_with_the_audit_log(tmp_path):
    import multiprocessing

    root = tmp_path / "reg"
    reg = Registry(root)
    _promote(reg, reg.register(_adapter(tmp_path / "a0"), parent=None))
    _promote(reg, reg.register(_adapter(tmp_path / "a1"), parent="v0"))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_race_worker, args=(str(root), role, 15)) for role in ("operator", "loop")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    final = Registry(root)
    audit = final.audit()
    registered = [e["version"] for e in audit if e["event"] == "register"]
    assert registered == list(final.versions) and len(registered) == 2 + 15  # no version was lost
    assert final.serving == [e for e in audit if e["event"] == "serving"][-1]["version"]
    assert [v for v, d in final.versions.items() if d["status"] == "serving"] == [final.serving]
    assert all(f"loop_{i}" in final.state for i in range(15))  # no state update was lost
    assert all(final.servable(e["version"])[0] for e in audit if e["event"] == "serving")


# ------------------------------------------------------------------------------------------ whole cycles
class AdminServer:
    """Records POST /v1/admin/versions bodies, as `posttrain serve` would receive them, and answers GET /v1/models
    with what it was last switched to (``serving``)."""

    def __init__(self, serving: str | None = None):
        self.bodies: list[dict] = []
        self.serving = serving
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, body: dict):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "assistant", "version": outer.serving}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                outer.serving = body["version"]
                self._send({})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _store_with_feedback(tmp_path, n: int):
    from posttrain.feedback.store import FeedbackStore

    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    for i in range(n):
        cid = f"c{i}"
        store.log_completion(id=cid, model="assistant", version="v0",
                             messages=[{"role": "user", "content": f"What is {i} plus {i}?"}],
                             response=f"{2 * i}" if i % 2 == 0 else f"The answer might be {2 * i + 1}, I think.",
                             sampling={"temperature": 0.7})
        store.add_feedback(completion_id=cid, kind="thumbs", value="up" if i % 2 == 0 else "down")
    return store


def _loop_config(tmp_path, tiny_model_dir, **over):
    from posttrain.loop.run import load_loop_config

    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
                               for i in range(4)))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"A general sentence number {i} about the weather."}) + "\n" for i in range(4)))
    args = [f"model={tiny_model_dir}", f"registry={tmp_path / 'reg'}", "min_feedback=8",
            "train={max_steps: 2, batch_size: 4, lr: 1.0e-3}", f"gates.prompts={prompts}",
            "gates.rewards=[{function: numeric_match}]", "gates.max_new_tokens=8", f"gates.general_data={general}",
            *[f"{k}={v}" for k, v in over.items()]]
    return load_loop_config(None, args)


def test_cycle_waits_then_rejects_a_candidate_that_fails_a_gate_and_it_never_serves(tmp_path, tiny_model_dir):
    from posttrain.loop.run import run_cycle

    cfg = _loop_config(tmp_path, tiny_model_dir, **{"gates.max_perplexity_increase": -1.0})  # impossible
    reg = Registry(cfg.registry)
    store = _store_with_feedback(tmp_path, 4)
    assert run_cycle(cfg, reg, store, log=lambda *_: None) == {"event": "waiting", "new_feedback": 4, "needed": 8}
    assert reg.serving == "v0" and reg.versions["v0"]["adapter"]  # the fresh LoRA registered as v0
    _add_more(store, 4, 8)
    out = run_cycle(cfg, reg, store, log=lambda *_: None)
    assert out["event"] == "reject" and out["version"] == "v1" and out["parent"] == "v0"
    assert any(r.startswith("FAIL: general perplexity") for r in out["reasons"])
    assert reg.serving == "v0" and reg.versions["v1"]["status"] == "rejected"
    assert set(out["metrics"]["candidate"]) >= {"reward", "perplexity", "mean_words", "duplicate_share"}
    assert reg.versions["v1"]["data"]["kto.jsonl"]  # the training data's hash
    with pytest.raises(PosttrainError, match="never serves"):
        reg.rollback("v1")
    # The feedback was consumed: the next check waits again.
    assert run_cycle(cfg, reg, store, log=lambda *_: None)["event"] == "waiting"


def _add_more(store, start, stop):
    for i in range(start, stop):
        cid = f"c{i}"
        store.log_completion(id=cid, model="assistant", version="v0", messages=[{"role": "user", "content": f"Add {i} and {i}."}],
                             response=str(2 * i) if i % 2 == 0 else "no idea", sampling={})
        store.add_feedback(completion_id=cid, kind="thumbs", value="up" if i % 2 == 0 else "down")


def test_cycle_promotes_switches_the_server_and_rollback_switches_back(tmp_path, tiny_model_dir, monkeypatch):
    from posttrain.commands.rollback import main as main_rollback
    from posttrain.loop.run import run_cycle

    server = AdminServer(serving="v0")
    monkeypatch.setenv("POSTTRAIN_ADMIN_KEY", "k-123")
    try:
        cfg = _loop_config(tmp_path, tiny_model_dir, server_url=server.url, **{
            "gates.min_reward_gain": -1.0, "gates.max_perplexity_increase": 100.0, "gates.max_length_change": 100.0,
            "gates.max_duplicate_share": 1.0})  # gates that cannot fail
        reg = Registry(cfg.registry)
        store = _store_with_feedback(tmp_path, 8)
        out = run_cycle(cfg, reg, store, log=lambda *_: None)
        assert out["event"] == "promote" and reg.serving == "v1"
        assert server.bodies[-1] == {"path": "/v1/admin/versions", "auth": "Bearer k-123", "model": "assistant",
                                     "version": "v1"}  # the admin key; a registry version, never a path
        assert main_rollback(["v0", f"registry={cfg.registry}", f"server_url={server.url}", "--reason", "test"]) == 0
        assert Registry(cfg.registry).serving == "v0" and server.bodies[-1]["version"] == "v0"
        assert [e["event"] for e in Registry(cfg.registry).audit()][-4:] == ["promote", "serving", "rollback", "serving"]
    finally:
        server.close()


def test_loop_config_errors_are_clear(tmp_path):
    from posttrain.loop.run import load_loop_config

    with pytest.raises(ConfigError, match="improvement gate"):
        load_loop_config(None, [])
    with pytest.raises(ConfigError, match="gates.prompts: .*no such file"):
        load_loop_config(None, ["gates.prompts=missing.jsonl", "gates.rewards=[{function: numeric_match}]"])


def test_kto_balance_weights_make_the_classes_weigh_the_same(tmp_path):
    from posttrain.loop.run import kto_balance

    path = tmp_path / "k.jsonl"
    path.write_text("".join(json.dumps({"label": i < 14}) + "\n" for i in range(64)))  # 14 up, 50 down
    d, u = kto_balance(path)
    assert (d, u) == (50 / 14, 1.0) and d * 14 / (u * 50) == pytest.approx(1.0)
    path.write_text("".join(json.dumps({"label": True}) + "\n" for _ in range(3)))
    assert kto_balance(path) is None


def test_schedule_trigger_starts_a_cycle_with_few_items_once_its_time_has_come(tmp_path, tiny_model_dir):
    from posttrain.loop.run import run_cycle

    cfg = _loop_config(tmp_path, tiny_model_dir, every_s=3600, min_feedback=1000, **{"gates.max_perplexity_increase": -1.0})
    reg = Registry(cfg.registry)
    store = _store_with_feedback(tmp_path, 8)
    t0 = reg.versions.get("v0", {}).get("created") or 0
    out = run_cycle(cfg, reg, store, log=lambda *_: None, now=lambda: t0 + 10)  # registers v0 first
    assert out["event"] == "waiting"
    out = run_cycle(cfg, reg, store, log=lambda *_: None, now=lambda: reg.versions["v0"]["created"] + 3601)
    assert out["event"] == "reject" and out["version"] == "v1"  # 8 items < 1000, but the hour has passed


def test_a_crash_between_the_registry_write_and_the_server_switch_is_reconciled(tmp_path, monkeypatch):
    """Finding 5: the registry recorded a promotion before the server confirmed it, and nothing reconciled."""
    import subprocess
    import sys

    from posttrain.loop.run import LoopConfig, reconcile, switch

    root = tmp_path / "reg"
    reg = Registry(root)
    _promote(reg, reg.register(_adapter(tmp_path / "a0"), parent=None))
    a1 = _adapter(tmp_path / "a1")
    # a loop process that promotes v1 and dies before it can tell the server
    crash = (f"import os; from posttrain.loop.registry import Registry; r = Registry({str(root)!r}); "
             f"v = r.register({str(a1)!r}, parent='v0'); r.decide(v, True, ['pass'], {{}}); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", crash], timeout=120).returncode == 9
    reg.reload()
    assert reg.serving == "v0" and reg.pending["version"] == "v1"  # the truth: the server still serves v0

    cfg = LoopConfig(registry=str(root), server_url="http://127.0.0.1:9")  # nothing listens: the server is down
    with pytest.raises(PosttrainError, match="keeps the switch pending"):
        switch(cfg, reg, "v1")
    assert Registry(root).pending["version"] == "v1" and reg.audit()[-1]["event"] == "switch_failed"

    server = AdminServer(serving="v0")  # the server is back, still on v0
    monkeypatch.setenv("POSTTRAIN_ADMIN_KEY", "adm")
    try:
        cfg.server_url = server.url
        assert "now serves assistant = v1" in reconcile(cfg, reg, log=lambda *_: None)
        assert server.bodies[-1]["version"] == "v1" and server.bodies[-1]["auth"] == "Bearer adm"
        assert Registry(root).serving == "v1" and Registry(root).pending is None
        # a crash after the switch but before the confirmation: the server already serves it, no second switch
        reg.rollback("v0", "test")
        server.serving = "v0"
        posts = len(server.bodies)
        assert "already served" in reconcile(cfg, reg, log=lambda *_: None)
        assert len(server.bodies) == posts and Registry(root).serving == "v0"
        # a server restarted on another version is switched back to the registry's
        server.serving = "v1"
        reconcile(cfg, reg, log=lambda *_: None)
        assert server.serving == "v0" and Registry(root).serving == "v0"
    finally:
        server.close()

