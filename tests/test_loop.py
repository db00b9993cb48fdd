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


def test_registry_promotes_rejects_rolls_back_and_audits(tmp_path):
    reg = Registry(tmp_path / "reg")
    v0 = reg.register(_adapter(tmp_path / "a0"), parent=None)
    reg.decide(v0, True, ["initial"], {})
    v1 = reg.register(_adapter(tmp_path / "a1"), parent=v0, data={"kto.jsonl": "abc"})
    reg.decide(v1, True, ["pass: reward"], {"candidate": {"reward": 1}})
    v2 = reg.register(_adapter(tmp_path / "a2"), parent=v1)
    reg.decide(v2, False, ["FAIL: perplexity"], {})
    assert reg.serving == v1 and reg.versions[v0]["status"] == "retired" and reg.versions[v2]["status"] == "rejected"
    with pytest.raises(PosttrainError, match="rejected by the gates"):
        reg.rollback(v2)
    reg.rollback(v0, "v1 answers worse in production")
    again = Registry(tmp_path / "reg")  # reloaded from disk
    assert again.serving == v0 and again.versions[v1]["status"] == "retired"
    assert again.versions[v1]["data"] == {"kto.jsonl": "abc"} and again.versions[v1]["parent"] == v0
    events = [(e["event"], e["version"]) for e in again.audit()]
    assert events == [("register", "v0"), ("promote", "v0"), ("register", "v1"), ("promote", "v1"),
                      ("register", "v2"), ("reject", "v2"), ("rollback", "v0")]
    assert (tmp_path / "reg" / "versions" / "v1" / "adapter_config.json").is_file()  # a copy, not a link
    with pytest.raises(PosttrainError, match="not in the registry"):
        again.rollback("v9")


# ------------------------------------------------------------------------------------------ whole cycles
class AdminServer:
    """Records POST /v1/admin/versions bodies, as `posttrain serve` would receive them."""

    def __init__(self):
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer.bodies.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                     **json.loads(self.rfile.read(int(self.headers["Content-Length"])))})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

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
    from posttrain.loop.run import main_rollback, run_cycle

    server = AdminServer()
    monkeypatch.setenv("POSTTRAIN_API_KEY", "k-123")
    try:
        cfg = _loop_config(tmp_path, tiny_model_dir, server_url=server.url, **{
            "gates.min_reward_gain": -1.0, "gates.max_perplexity_increase": 100.0, "gates.max_length_change": 100.0,
            "gates.max_duplicate_share": 1.0})  # gates that cannot fail
        reg = Registry(cfg.registry)
        store = _store_with_feedback(tmp_path, 8)
        out = run_cycle(cfg, reg, store, log=lambda *_: None)
        assert out["event"] == "promote" and reg.serving == "v1"
        assert server.bodies[-1] == {"path": "/v1/admin/versions", "auth": "Bearer k-123", "model": "assistant",
                                     "adapter": reg.versions["v1"]["adapter"], "version": "v1"}
        assert main_rollback(["v0", f"registry={cfg.registry}", f"server_url={server.url}", "--reason", "test"]) == 0
        assert Registry(cfg.registry).serving == "v0" and server.bodies[-1]["version"] == "v0"
        assert [e["event"] for e in Registry(cfg.registry).audit()][-2:] == ["promote", "rollback"]
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
