"""The feedback store on SQLite and a real PostgreSQL, and ``posttrain feedback export``.

PostgreSQL tests need ``POSTTRAIN_TEST_PG_URL`` (``.ci/postgres.sh start`` prints one); each test gets its own
schema. Without it they are skipped with that reason; SQLite tests always run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from posttrain.feedback.store import FeedbackStore, UnknownCompletion

PG_URL = os.environ.get("POSTTRAIN_TEST_PG_URL")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/feedback.db"
        return
    if not PG_URL:
        pytest.skip("POSTTRAIN_TEST_PG_URL is not set; `.ci/postgres.sh start` starts a server and prints the URL")
    from sqlalchemy import create_engine, make_url, text

    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
    with admin.connect() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def store(store_url):
    with FeedbackStore(store_url) as s:
        yield s


def _log(store: FeedbackStore, cid: str, prompt: str, response: str) -> None:
    store.log_completion(id=cid, model="smollm2-135m", version="v1", messages=[{"role": "user", "content": prompt}],
                         response=response, sampling={"temperature": 0.7, "max_tokens": 64})


def test_round_trip(store):
    _log(store, "a", "What is two plus two?", "Five.")
    _log(store, "b", "What is two plus two?", "Four.")
    assert store.get_completion("a") == {
        "seq": 1, "id": "a", "model": "smollm2-135m", "version": "v1",
        "messages": [{"role": "user", "content": "What is two plus two?"}], "response": "Five.",
        "sampling": {"temperature": 0.7, "max_tokens": 64}, "created": store.get_completion("a")["created"],
        "owner": None}
    assert store.get_completion("nope") is None
    with pytest.raises(ValueError, match="'a' is already logged"):
        _log(store, "a", "again", "again")
    ids = [store.add_feedback(completion_id="a", kind="thumbs", value="down", comment="wrong sum"),
           store.add_feedback(completion_id="b", kind="rating", value=5),
           store.add_feedback(completion_id="b", kind="preference", value="a"),
           store.add_feedback(completion_id="a", kind="correction", value="Four.")]
    assert ids == sorted(ids) and len(set(ids)) == 4
    items = list(store.iter_feedback())
    assert [(i["completion_id"], i["kind"], i["value"], i["comment"]) for i in items] == [
        ("a", "thumbs", "down", "wrong sum"), ("b", "rating", 5, None), ("b", "preference", "a", None),
        ("a", "correction", "Four.", None)]
    assert items[0]["response"] == "Five." and items[0]["messages"][0]["content"] == "What is two plus two?"
    assert items[0]["version"] == "v1" and items[0]["other"] is None
    assert items[2]["other"]["id"] == "a" and items[2]["other"]["response"] == "Five."
    assert [i["id"] for i in store.iter_feedback(since_id=ids[1])] == ids[2:]
    assert store.count_feedback() == 4 and store.count_feedback(since_id=ids[2]) == 1
    assert store.max_feedback_id() == ids[-1]
    assert [c["id"] for c in store.iter_completions()] == ["a", "b"]
    assert [c["id"] for c in store.iter_completions(since_id=1)] == ["b"]


def test_invalid_feedback_is_refused_with_the_field_named(store):
    _log(store, "a", "Hi", "Hello!")
    cases = [
        (dict(kind="rating", value=6), ValueError, "value: a rating is an integer from 1 to 5, got 6"),
        (dict(kind="rating", value="5"), ValueError, "rating is an integer"),
        (dict(kind="rating", value=True), ValueError, "rating is an integer"),
        (dict(kind="thumbs", value="sideways"), ValueError, "'up' or 'down'"),
        (dict(kind="correction", value="  "), ValueError, "value: a correction is the corrected response text"),
        (dict(kind="preference", value="a"), ValueError, "two different completions"),
        (dict(kind="preference", value="ghost"), UnknownCompletion, "unknown completion id 'ghost'"),
        (dict(kind="stars", value=3), ValueError, "kind: expected one of thumbs, rating, preference, correction"),
        (dict(kind="thumbs", value="up", comment=3), ValueError, "comment: expected a string"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            store.add_feedback(completion_id="a", **kwargs)
    with pytest.raises(UnknownCompletion, match="unknown completion id 'missing'"):
        store.add_feedback(completion_id="missing", kind="thumbs", value="up")
    assert store.count_feedback() == 0


# A writer process: adds thumbs feedback to completion argv[2], argv[3] times (-1: until killed), and prints each
# id once add_feedback has returned it, i.e. once the write is acknowledged.
WRITER = """
import sys
from posttrain.feedback.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
n, i = int(sys.argv[3]), 0
while i != n:
    print(store.add_feedback(completion_id=sys.argv[2], kind="thumbs", value=("up", "down")[i % 2]), flush=True)
    i += 1
"""


def _writer(url: str, cid: str, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, url, cid, str(n)], stdout=subprocess.PIPE, text=True)


def test_concurrent_writers_lose_nothing(store, store_url):
    _log(store, "c", "Hi", "Hello!")
    processes = [_writer(store_url, "c", 50) for _ in range(2)]
    acknowledged: list[int] = []
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for i in range(50):
                acknowledged.append(store.add_feedback(completion_id="c", kind="rating", value=1 + (i + k) % 5))
        except BaseException as e:  # surfaced below: a thread's exception would otherwise only be printed
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in processes:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        acknowledged += [int(line) for line in out.split()]
    assert not errors, errors
    assert len(acknowledged) == 8 * 50 + 2 * 50 == len(set(acknowledged))
    stored = {item["id"] for item in store.iter_feedback()}
    assert set(acknowledged) <= stored and store.count_feedback() == len(stored) == 500
    ordered = [item["id"] for item in store.iter_feedback()]
    assert ordered == sorted(ordered)


def test_killed_writer_loses_no_acknowledged_write(store, store_url):
    _log(store, "k", "Hi", "Hello!")
    p = _writer(store_url, "k", -1)
    printed = [int(p.stdout.readline()) for _ in range(30)]
    os.kill(p.pid, signal.SIGKILL)  # mid-run: the next write is in flight
    rest, _ = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    printed += [int(line) for line in rest.split()]
    stored = {item["id"] for item in store.iter_feedback()}
    assert set(printed) <= stored
    assert len(stored) - len(printed) <= 1  # at most the write killed between commit and print
    store.add_feedback(completion_id="k", kind="thumbs", value="up")  # the database is still usable
    with FeedbackStore(store_url) as reopened:
        assert reopened.count_feedback() == len(stored) + 1


# ------------------------------------------------------------------------------------------ export
NOTES = ("The team agreed to ship the release after the final review of the test results and the documentation "
         "updates, with sign off from QA expected on")


def _crafted(store: FeedbackStore) -> dict[str, int]:
    """A store exercising every rule of the export; returns the feedback ids by name."""
    two = "What is two plus two?"
    for cid, prompt, response in [
        ("sum-wrong", two, "Two plus two is five."), ("sum-right", two, "Two plus two is four."),
        ("colour", "Name a primary colour.", "Green is a primary colour of paint."),
        ("haiku", "Write a haiku about rain.", "Soft rain on the roof / the garden drinks slowly / clouds drift to the sea"),
        ("capital", "What is the capital of France?", "Paris is the capital of France."),
        ("other-prompt", "What is the capital of Spain?", "Barcelona is the capital of Spain."),
        ("notes", "Summarise the meeting notes.", f"{NOTES} Monday."),
        ("contact", "How do I contact support?", "I do not know how to contact support."),
        ("hi-1", "Say hi.", "Hi there, nice to meet you!"), ("hi-2", "Say hi.", "Hi there, nice to meet you!"),
        ("meh", "Tell me a fact.", "Water is wet."),
    ]:
        _log(store, cid, prompt, response)
    add = store.add_feedback
    return {
        "colour-up": add(completion_id="colour", kind="thumbs", value="up"),
        "colour-down": add(completion_id="colour", kind="thumbs", value="down"),  # conflicts: the latest wins
        "haiku-5": add(completion_id="haiku", kind="rating", value=5),
        "capital-3": add(completion_id="capital", kind="rating", value=3),
        "sum-pref": add(completion_id="sum-right", kind="preference", value="sum-wrong"),
        "notes-fix": add(completion_id="notes", kind="correction", value=f"{NOTES} Tuesday."),
        "capital-pref": add(completion_id="capital", kind="preference", value="other-prompt"),
        "contact-fix": add(completion_id="contact", kind="correction", value="Write to help@example.com."),
        "hi-1-up": add(completion_id="hi-1", kind="thumbs", value="up"),
        "hi-2-up": add(completion_id="hi-2", kind="thumbs", value="up"),
        "meh-3": add(completion_id="meh", kind="rating", value=3),
    }


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _text(messages: list[dict]) -> str:
    return messages[-1]["content"]


def test_export_kto_dpo_sft_rows_load(store, tmp_path, tokenizer):
    from posttrain.data.dataset import load_sft_dataset
    from posttrain.data.preference import load_pair_dataset, load_unpaired_dataset
    from posttrain.feedback.export import OVERRIDDEN, export_feedback

    ids = _crafted(store)

    kto = export_feedback(store, "kto", tmp_path / "kto.jsonl")
    rows = _rows(tmp_path / "kto.jsonl")
    labels = {(r["prompt"][0]["content"], _text(r["completion"])): r["label"] for r in rows}
    assert labels == {
        ("Name a primary colour.", "Green is a primary colour of paint."): False,  # up, then down: the latest
        ("Write a haiku about rain.", "Soft rain on the roof / the garden drinks slowly / clouds drift to the sea"): True,
        ("What is two plus two?", "Two plus two is four."): True,
        ("What is two plus two?", "Two plus two is five."): False,
        # a correction and its original differ in one word: near-duplicates, kept as the contrast they are
        ("Summarise the meeting notes.", f"{NOTES} Tuesday."): True,
        ("Summarise the meeting notes.", f"{NOTES} Monday."): False,
        ("What is the capital of France?", "Paris is the capital of France."): True,  # the preference beats the 3
        ("What is the capital of Spain?", "Barcelona is the capital of Spain."): False,
        ("How do I contact support?", "Write to [EMAIL]."): True,  # PII redacted
        ("How do I contact support?", "I do not know how to contact support."): False,
        ("Say hi.", "Hi there, nice to meet you!"): True,  # twice in the raw rows: one is an exact duplicate
    }
    assert kto.items_read == 11 == kto.used + sum(kto.skipped.values())
    assert kto.skipped == {OVERRIDDEN: 2, "rating 3: neutral (between 2 and --min-rating)": 1}
    assert kto.produced == 12 == kto.kept + sum(kto.dropped.values()) and kto.dropped == {"exact duplicate": 1}
    assert kto.kept_by_label == {"desirable": 6, "undesirable": 5} and kto.pii_redacted == 1
    assert [r["feedback_id"] for r in rows] == sorted(r["feedback_id"] for r in rows)
    rejects = _rows(tmp_path / "kto.jsonl.rejects.jsonl")
    assert [r["reason"] for r in rejects] == ["exact duplicate"] and rejects[0]["row"]["feedback_id"] == ids["hi-2-up"]
    raw = (tmp_path / "kto.jsonl.raw.jsonl").read_text().splitlines()
    assert json.loads(raw[int(rejects[0]["where"].rsplit(":", 1)[1]) - 1]) == rejects[0]["row"]
    examples, _ = load_unpaired_dataset(tmp_path / "kto.jsonl", tokenizer, max_length=256)
    assert [e.desirable for e in examples] == [r["label"] for r in rows]

    dpo = export_feedback(store, "dpo", tmp_path / "dpo.jsonl")
    pairs = {(_text(r["chosen"]), _text(r["rejected"])) for r in _rows(tmp_path / "dpo.jsonl")}
    assert pairs == {("Two plus two is four.", "Two plus two is five."), (f"{NOTES} Tuesday.", f"{NOTES} Monday."),
                     ("Write to [EMAIL].", "I do not know how to contact support.")}
    assert dpo.skipped["preference between completions of different prompts"] == 1
    assert dpo.skipped["thumbs: dpo needs two responses to compare (export kto to use it)"] == 4
    assert dpo.used == 3 and dpo.kept == dpo.produced == 3
    examples, _ = load_pair_dataset(tmp_path / "dpo.jsonl", tokenizer, max_length=256)
    assert len(examples) == 3

    sft = export_feedback(store, "sft", tmp_path / "sft.jsonl", include_positive=True)
    replies = [_text(r["messages"]) for r in _rows(tmp_path / "sft.jsonl")]
    assert replies == ["Soft rain on the roof / the garden drinks slowly / clouds drift to the sea",
                       f"{NOTES} Tuesday.", "Write to [EMAIL].", "Hi there, nice to meet you!"]
    assert sft.skipped["negative judgment: sft has no use for it (export kto)"] == 1
    assert sft.dropped == {"exact duplicate": 1}
    examples, _ = load_sft_dataset(tmp_path / "sft.jsonl", tokenizer, max_length=256)
    assert len(examples) == 4

    since = export_feedback(store, "sft", tmp_path / "since.jsonl", since_id=ids["notes-fix"])
    assert [_text(r["messages"]) for r in _rows(tmp_path / "since.jsonl")] == ["Write to [EMAIL]."]
    assert since.last_id == ids["meh-3"]


def test_latest_feedback_wins(store, tmp_path):
    from posttrain.feedback.export import feedback_rows

    _log(store, "x", "Pick one.", "A")
    _log(store, "y", "Pick one.", "B")
    store.add_feedback(completion_id="x", kind="thumbs", value="up")
    store.add_feedback(completion_id="x", kind="rating", value=1)
    store.add_feedback(completion_id="x", kind="thumbs", value="up")
    store.add_feedback(completion_id="x", kind="preference", value="y")
    store.add_feedback(completion_id="y", kind="preference", value="x")  # changed their mind
    items = list(store.iter_feedback())
    rows, skipped = feedback_rows(items, "kto")
    assert sorted((_text(r.data["completion"]), r.data["label"]) for r in rows) == [("A", False), ("B", True)]
    assert len(skipped) == 4  # everything before the last preference was overridden
    rows, skipped = feedback_rows(items, "dpo")
    assert [(_text(r.data["chosen"]), _text(r.data["rejected"])) for r in rows] == [("B", "A")]
    assert sorted(skipped.values()).count("overridden by later feedback on the same completion") == 1


def test_cli_export(store, store_url, tmp_path, capsys):
    from posttrain.cli import main

    _crafted(store)
    out = tmp_path / "kto.jsonl"
    assert main(["feedback", "export", "--db", store_url, "--format", "kto", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "read 11 feedback items (2 correction, 2 preference, 3 rating, 4 thumbs): used 8, skipped 3" in printed
    assert "produced 12 kto rows: kept 11 (6 desirable, 5 undesirable), dropped 1 (1 exact duplicate)" in printed
    assert "next export: --since 11" in printed and len(_rows(out)) == 11
    assert main(["feedback", "export", "--db", store_url, "--format", "kto", "-o", str(out), "--min-rating", "2"]) == 2
    assert "--min-rating: expected 3, 4 or 5" in capsys.readouterr().err


def test_feedback_on_a_disconnected_stream_is_skipped_with_its_reason(store, tmp_path):
    """`posttrain serve` logs a stream cut by its client with finish_reason "disconnected": the user never saw the
    whole reply, so their judgment of it teaches nothing about the full response."""
    from posttrain.feedback.export import export_feedback

    _log(store, "whole", "Name a primary colour.", "Red.")
    store.log_completion(id="cut", model="m", version="v1", messages=[{"role": "user", "content": "Name a planet."}],
                         response="The planet", sampling={"finish_reason": "disconnected"})
    store.add_feedback(completion_id="whole", kind="thumbs", value="up")
    store.add_feedback(completion_id="cut", kind="thumbs", value="down")
    result = export_feedback(store, "kto", tmp_path / "kto.jsonl")
    assert result.used == 1 and result.skipped == {"its completion was cut off by a client disconnect": 1}
    rows = [json.loads(line) for line in (tmp_path / "kto.jsonl").read_text().splitlines()]
    assert [r["completion"][0]["content"] for r in rows] == ["Red."]


def test_feedback_with_an_owner_finds_only_that_owners_completions(store):
    for cid, owner in (("mine", "key-a"), ("theirs", "key-b"), ("anyone", None)):
        store.log_completion(id=cid, model="m", version="v1", messages=[{"role": "user", "content": "q"}],
                             response="r", sampling={}, owner=owner)
    assert store.get_completion("mine")["owner"] == "key-a"
    with pytest.raises(UnknownCompletion, match="for this API key"):
        store.add_feedback(completion_id="mine", kind="thumbs", value="up", owner="key-b")
    with pytest.raises(UnknownCompletion, match="theirs"):
        store.add_feedback(completion_id="mine", kind="preference", value="theirs", owner="key-a")
    assert store.add_feedback(completion_id="mine", kind="thumbs", value="up", owner="key-a")
    assert store.add_feedback(completion_id="theirs", kind="rating", value=2)  # no owner given: any completion
    assert [f["completion_id"] for f in store.iter_feedback()] == ["mine", "theirs"]


def test_a_database_from_before_owners_gets_the_column_on_open(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the completions table as earlier versions created it
        db.execute("CREATE TABLE completions (seq INTEGER PRIMARY KEY AUTOINCREMENT, id VARCHAR(128) NOT NULL UNIQUE, "
                   "model VARCHAR(256) NOT NULL, version VARCHAR(256) NOT NULL, messages TEXT NOT NULL, "
                   "response TEXT NOT NULL, sampling TEXT NOT NULL, created FLOAT NOT NULL)")
        db.execute("INSERT INTO completions (id, model, version, messages, response, sampling, created) "
                   "VALUES ('old', 'm', 'v0', '[]', 'r', '{}', 0)")
    with FeedbackStore(f"sqlite:///{path}") as s:
        assert s.get_completion("old")["owner"] is None
        s.log_completion(id="new", model="m", version="v1", messages=[], response="r", sampling={}, owner="k")
        assert s.get_completion("new")["owner"] == "k"
        assert s.add_feedback(completion_id="old", kind="thumbs", value="down")


def test_browsing_queries_filter_page_and_count_on_both_backends(store):
    """What `posttrain ui` reads: filtered pages newest first, counts by version/kind/value, thumbs and ratings."""
    for i, version in enumerate(("v0", "v0", "v1")):
        store.log_completion(id=f"c{i}", model="m", version=version, messages=[{"role": "user", "content": f"q{i}"}],
                             response=f"a{i}", sampling={}, created=1000.0 + i)
    store.add_feedback(completion_id="c0", kind="thumbs", value="up")
    store.add_feedback(completion_id="c1", kind="rating", value=2)
    store.add_feedback(completion_id="c2", kind="rating", value=2)
    store.add_feedback(completion_id="c2", kind="preference", value="c1")
    store.add_feedback(completion_id="c2", kind="correction", value="better")
    total, rows = store.query_feedback()
    assert total == 5 and [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    total, rows = store.query_feedback(kind="rating", version="v1")
    assert total == 1 and rows[0]["completion_id"] == "c2" and rows[0]["value"] == 2
    total, rows = store.query_feedback(limit=2, offset=1)
    assert total == 5 and len(rows) == 2
    now = time.time()
    assert store.query_feedback(since=now + 60)[0] == 0 and store.query_feedback(until=now + 60)[0] == 5
    with pytest.raises(ValueError, match="kind"):
        store.query_feedback(kind="stars")
    counts = sorted((c["version"], c["kind"], str(c["value"]), c["n"]) for c in store.feedback_counts())
    assert counts == [("v0", "rating", "2", 1), ("v0", "thumbs", "up", 1), ("v1", "correction", "None", 1),
                      ("v1", "preference", "None", 1), ("v1", "rating", "2", 1)]
    assert [(r["version"], r["kind"], r["value"]) for r in store.iter_scored()] == [
        ("v0", "thumbs", "up"), ("v0", "rating", 2), ("v1", "rating", 2), ("v1", "correction", "better")]
