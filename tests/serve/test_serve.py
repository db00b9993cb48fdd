"""`posttrain serve` on a tiny random Llama with two LoRA adapters, over a real socket with the official client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from posttrain.commands.serve import ServeConfig, ServeSamplingSection  # noqa: E402
from posttrain.errors import ConfigError  # noqa: E402
from posttrain.generation import encode_prompt  # noqa: E402
from posttrain.serve import resolve_api_keys  # noqa: E402
from posttrain.serve.app import create_app  # noqa: E402
from posttrain.serve.decode import Delta, Failed, Finished, Job, RowSampling, TextStream  # noqa: E402
from posttrain.serve.models import ModelRegistry  # noqa: E402
from posttrain.serve.worker import GenerationWorker, QueueFull  # noqa: E402
from tests.serving import HELLO, KEY, FakeStore, Server, save_lora  # noqa: E402


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return save_lora(tiny_model_dir, root / "a", 1), save_lora(tiny_model_dir, root / "b", 2)


def _config(tiny_model_dir, adapters, **kw) -> ServeConfig:
    a, b = adapters
    return ServeConfig(model=str(tiny_model_dir), model_name="tiny",
                       adapters={"assistant": {"adapter": a, "version": "v1"}, "other": {"adapter": b, "version": "b1"}},
                       max_tokens_limit=256, max_body_bytes=20_000, sampling=ServeSamplingSection(max_tokens=8), **kw)


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapters):
    # One intra-op thread: with the event loop and 16 client threads on a small CI machine, OpenMP workers spinning
    # at barriers make every forward pass several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = _config(tiny_model_dir, adapters)
    registry = ModelRegistry.load(cfg)
    registry.start()
    store = FakeStore()
    s = Server(create_app(registry, store, cfg, [KEY, "second-key"]), registry, store, cfg)
    yield s
    s.close()
    torch.set_num_threads(threads)


def _greedy(client, model, content="Say something.", max_tokens=12):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       temperature=0, max_tokens=max_tokens)
    return r


# ------------------------------------------------------------------------------------------ the official client
def test_openai_client_chat_stream_and_models(srv):
    client = srv.client()
    models = {m.id: m.to_dict()["version"] for m in client.models.list()}
    assert models == {"tiny": "base", "assistant": "v1", "other": "b1"}

    r = _greedy(client, "assistant")
    text = r.choices[0].message.content
    assert r.id.startswith("chatcmpl-") and r.model == "assistant" and r.system_fingerprint == "v1"
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    logged = srv.store.completions[r.id]
    assert logged["response"] == text and logged["version"] == "v1" and logged["model"] == "assistant"
    assert logged["messages"] == HELLO
    assert logged["sampling"]["temperature"] == 0 and logged["sampling"]["max_tokens"] == 12

    chunks = list(client.chat.completions.create(model="assistant", messages=HELLO, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # token by token
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id in srv.store.completions
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert srv.store.completions[chunks[0].id]["response"] == text

    # the base model and the other adapter answer differently from this adapter
    assert _greedy(client, "tiny").choices[0].message.content != text
    assert _greedy(client, "other").choices[0].message.content != text


def test_auth_failures(srv):
    with pytest.raises(openai.AuthenticationError):
        srv.client(key="wrong").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        srv.client(key="wrong").models.list()
    r = srv.http.get("/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert srv.client(key="second-key").models.list().data  # every configured key works
    assert srv.http.get("/health", timeout=10).status_code == 200  # health needs no key


def test_bad_requests_get_4xx_never_500(srv):
    def error(r, status):
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert body["message"] and body["type"]
        return body

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert "malformed JSON" in error(srv.http.post("/v1/chat/completions", content=b'{"model": "tiny", mess',
                                                headers=headers, timeout=10), 400)["message"]
    assert "malformed JSON" in error(srv.http.post("/v1/feedback", content=b"\xff\xfe{", headers=headers,
                                                timeout=10), 400)["message"]
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert error(srv.post("/v1/chat/completions", big), 413)["code"] == "request_too_large"
    assert error(srv.post("/v1/chat/completions", big, key="wrong"), 413)  # size is checked before anything
    chunked = iter([b'{"model": "tiny", "messages": [{"role": "user", "content": "', b"x" * 15_000, b"x" * 15_000])
    assert error(srv.http.post("/v1/chat/completions", content=chunked, headers=headers), 413)  # no Content-Length
    assert error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": HELLO}, key="wrong"), 401)
    assert error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "max_tokens": 257}),
                 400)["param"] == "max_tokens"
    e = error(srv.post("/v1/chat/completions", {"model": "nope", "messages": HELLO}), 404)
    assert e["code"] == "model_not_found" and "assistant" in e["message"]
    assert "n:" in error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "n": 2}), 400)["message"]
    assert error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "bogus": 1}), 400)["param"] == "bogus"
    assert error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}),
                 400)["param"] == "messages.0.role"
    assert error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": []}), 400)["param"] == "messages"
    assert error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "temperature": -1}),
                 400)["param"] == "temperature"
    assert error(srv.post("/v1/chat/completions", ["not", "an", "object"]), 400)
    e = error(srv.post("/v1/feedback", {"completion_id": "chatcmpl-unknown", "thumbs": "up"}), 404)
    assert e["code"] == "completion_not_found" and "chatcmpl-unknown" in e["message"]
    assert "exactly one" in error(srv.post("/v1/feedback", {"completion_id": "x", "thumbs": "up", "rating": 3}), 400)["message"]
    assert error(srv.post("/v1/feedback", {"completion_id": "x", "rating": 7}), 400)["param"] == "rating"
    assert error(srv.post("/v1/feedback", {"completion_id": "x", "thumbs": "sideways"}), 400)["param"] == "thumbs"
    with pytest.raises(ConfigError, match="not a PEFT adapter directory"):
        srv.registry.set_version("assistant", "/nonexistent", "v9")
    with pytest.raises(ConfigError, match="is the base model"):
        srv.registry.set_version("tiny", "/x", "v9")
    assert error(srv.http.get("/v1/nowhere", headers=headers, timeout=10), 404)
    assert error(srv.http.get("/v1/chat/completions", headers=headers, timeout=10), 405)
    assert srv.registry.served()["assistant"] == "v1"


def test_feedback_is_recorded(srv):
    client = srv.client()
    first, second = _greedy(client, "assistant"), _greedy(client, "other")
    for body in ({"thumbs": "up", "comment": "nice"}, {"rating": 4}, {"preferred_over": second.id},
                 {"correction": "A better answer."}):
        r = srv.post("/v1/feedback", {"completion_id": first.id, **body})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "recorded" and srv.store.feedback[r.json()["id"] - 1]["completion_id"] == first.id
    kinds = [f["kind"] for f in srv.store.feedback if f["completion_id"] == first.id]
    assert kinds == ["thumbs", "rating", "preference", "correction"]
    r = srv.post("/v1/feedback", {"completion_id": first.id, "preferred_over": "chatcmpl-gone"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "preferred_over"


def test_many_concurrent_clients_all_answered(srv):
    client = srv.client()
    batches_before = srv.registry.worker.batches

    def one(i):
        r = client.chat.completions.create(model=["assistant", "other", "tiny"][i % 3], max_tokens=6,
                                           messages=[{"role": "user", "content": f"Question {i}?"}])
        ack = srv.post("/v1/feedback", {"completion_id": r.id, "rating": 1 + i % 5})
        return r, ack

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert all(r.choices[0].message.content is not None and ack.status_code == 200 for r, ack in results)
    ids = {r.id for r, _ in results}
    assert len(ids) == 32 and ids <= set(srv.store.completions)
    assert {f["completion_id"] for f in srv.store.feedback} >= ids
    assert srv.registry.worker.largest_batch > 1  # requests that waited together ran together
    assert srv.registry.worker.batches - batches_before < 32


def test_stream_disconnect_logs_what_was_sent(srv):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 256, "temperature": 0, "stream": True}
    seen = ""
    with srv.http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                chunk = json.loads(line[5:])
                seen += chunk["choices"][0]["delta"].get("content", "")
                if seen:
                    break  # hang up mid-stream
    deadline = time.time() + 10
    while chunk["id"] not in srv.store.completions:
        assert time.time() < deadline, "a disconnected stream was not logged"
        time.sleep(0.05)
    logged = srv.store.completions[chunk["id"]]
    assert logged["sampling"]["finish_reason"] == "disconnected" and logged["response"].startswith(seen)


# ------------------------------------------------------------------------------------------ hot swap
def test_hot_swap_promotion_and_rollback(srv, adapters):
    a_dir, b_dir = adapters
    client = srv.client()
    text_a = _greedy(client, "assistant").choices[0].message.content
    text_b = _greedy(client, "other").choices[0].message.content
    assert text_a != text_b

    # A request in flight when the swap happens finishes on the version it started with.
    in_flight, started = {}, threading.Event()

    def stream_long():
        chunks = []
        for chunk in client.chat.completions.create(model="assistant", messages=HELLO, temperature=0,
                                                    max_tokens=200, stream=True):
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
        in_flight["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        in_flight["versions"] = {c.system_fingerprint for c in chunks}
        in_flight["finish"] = chunks[-1].choices[0].finish_reason

    thread = threading.Thread(target=stream_long)
    held = srv.registry.acquire("assistant")  # a request admitted before the swap, not yet running
    thread.start()
    assert started.wait(30)  # the stream is generating...
    assert srv.registry.set_version("assistant", b_dir, "v2") == "v1"  # ...when the swap happens
    thread.join(30)
    assert in_flight["versions"] == {"v1"} and in_flight["text"].startswith(text_a)
    assert in_flight["finish"] in ("stop", "length")

    r = _greedy(client, "assistant")
    assert r.system_fingerprint == "v2" and r.choices[0].message.content == text_b
    assert {m.id: m.to_dict()["version"] for m in client.models.list()}["assistant"] == "v2"
    assert len(srv.registry.loaded_adapters()) == 3  # the held lease keeps v1 in memory...
    done = threading.Event()
    pieces = []
    srv.registry.submit(held, encode_prompt(srv.registry.tokenizer, HELLO),
                        RowSampling(max_tokens=12, temperature=0, top_p=1),
                        lambda e: pieces.append(e.text) if isinstance(e, Delta) else done.set())
    assert done.wait(10) and "".join(pieces) == text_a  # ...and it still answers on v1
    deadline = time.time() + 5
    while len(srv.registry.loaded_adapters()) != 2:  # ...then v1 is deleted
        assert time.time() < deadline, srv.registry.loaded_adapters()
        time.sleep(0.05)

    # Rollback (the admin route does this for registry versions: test_serve_security.py).
    assert srv.registry.set_version("assistant", a_dir, "v1") == "v2"
    r = _greedy(client, "assistant")
    assert r.system_fingerprint == "v1" and r.choices[0].message.content == text_a
    # A new name can be published the same way.
    assert srv.registry.set_version("fresh", b_dir, "f1") is None
    assert _greedy(client, "fresh").choices[0].message.content == text_b


# ------------------------------------------------------------------------------------------ limits and units
def test_full_queue_is_503(srv):
    cfg = srv.cfg
    idle = ModelRegistry(srv.registry.model, srv.registry.tokenizer, base_name="tiny", max_queue=1)  # never started
    app = create_app(idle, FakeStore(), cfg, None)
    body = {"model": "tiny", "messages": HELLO}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            waiting = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            while idle.worker.queued() < 1:
                await asyncio.sleep(0.01)
            second = await c.post("/v1/chat/completions", json=body)
            waiting.cancel()
            return second

    r = asyncio.run(go())
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"


def test_worker_batches_by_group_and_survives_failures():
    seen = []

    def run_batch(jobs):
        seen.append([j.prompt_ids[0] for j in jobs])
        if jobs[0].group == "bad":
            raise RuntimeError("boom")
        for j in jobs:
            j.emit(Finished("stop", 1))

    events = []
    worker = GenerationWorker(run_batch, batch_size=2, max_queue=5)
    jobs = [Job([i], RowSampling(1, 0, 1), group=g, emit=events.append) for i, g in enumerate("aabab")]
    for job in jobs:
        worker.submit(job)
    with pytest.raises(QueueFull):
        worker.submit(Job([9], RowSampling(1, 0, 1), group="a", emit=events.append))
    bad = Job([7], RowSampling(1, 0, 1), group="bad", emit=events.append)
    worker.start()
    try:
        deadline = time.time() + 5
        while len(events) < 5:
            assert time.time() < deadline
            time.sleep(0.01)
        worker.submit(bad)
        while len(events) < 6:
            assert time.time() < deadline
            time.sleep(0.01)
        assert worker.call(lambda: "ran on the model thread") == "ran on the model thread"
    finally:
        worker.stop()
    assert seen[:3] == [[0, 1], [2, 4], [3]]  # oldest first, same group together, at most batch_size
    assert isinstance(events[-1], Failed) and "boom" in events[-1].message


def test_text_stream_withholds_stop_strings_and_partial_characters(tokenizer):
    text = "Hello wor—ld 😀 and END of story"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stream, pieces, stopped = TextStream(tokenizer, ["END"]), [], False
    for token in ids:
        piece, stopped = stream.push(token)
        assert "\ufffd" not in piece
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "Hello wor—ld 😀 and "
    stream, pieces = TextStream(tokenizer, ["never"]), []
    for token in ids:
        pieces.append(stream.push(token)[0])
    assert "".join(pieces) + stream.flush() == text


def test_keys_and_cli(monkeypatch, capsys):
    from posttrain.cli import main

    monkeypatch.delenv("POSTTRAIN_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="no-auth"):
        resolve_api_keys(ServeConfig())
    assert resolve_api_keys(ServeConfig(auth=False)) is None
    monkeypatch.setenv("POSTTRAIN_API_KEY", "k1, k2")
    assert resolve_api_keys(ServeConfig(api_keys=["k0"])) == ["k0", "k1", "k2"]
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--no-auth" in out and "max_tokens_limit" in out and "adapters" in out
    monkeypatch.delenv("POSTTRAIN_API_KEY")
    assert main(["serve", "port=1"]) == 2 and "no API key" in capsys.readouterr().err


def test_engine_key_and_health_say_which_engine_runs(srv, tiny_model_dir):
    from posttrain.config import build
    from posttrain.serve import load_registry
    from posttrain.vllm_backend import vllm_available

    assert srv.http.get("/health", timeout=10).json()["engine"] == "builtin"  # the default engine
    assert build(ServeConfig, {"engine": "vllm", "vllm": {"memory": 0.2, "max_loras": 2}}).vllm.max_loras == 2
    for bad in ({"engine": "tgi"}, {"vllm": {"memory": 1.5}}, {"vllm": {"max_loras": 0}}, {"vllm": {"rank": 8}}):
        with pytest.raises(ConfigError):
            build(ServeConfig, bad).validate()
    if not vllm_available():  # engine=vllm without vLLM: a ConfigError saying how to install it, no model loaded
        with pytest.raises(ConfigError, match="make vllm"):
            load_registry(ServeConfig(model=str(tiny_model_dir), engine="vllm"))


def test_with_the_real_feedback_store(srv, tmp_path):
    pytest.importorskip("sqlalchemy")
    from posttrain.feedback.store import FeedbackStore

    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    app = create_app(srv.registry, store, srv.cfg, [KEY])
    headers = {"Authorization": f"Bearer {KEY}"}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers) as c:
            chat = await c.post("/v1/chat/completions", json={"model": "assistant", "messages": HELLO, "stop": ["\n"]})
            cid = chat.json()["id"]
            return chat, [await c.post("/v1/feedback", json=body) for body in (
                {"completion_id": cid, "thumbs": "down", "comment": "meh"},
                {"completion_id": cid, "correction": "Better."},
                {"completion_id": "chatcmpl-nope", "rating": 3},
                {"completion_id": cid, "preferred_over": cid},
            )]

    chat, (thumbs, correction, unknown, self_pref) = asyncio.run(go())
    assert chat.status_code == 200 and thumbs.status_code == 200 and correction.status_code == 200
    assert unknown.status_code == 404 and self_pref.status_code == 400
    assert self_pref.json()["error"]["param"] == "preferred_over"
    logged = store.get_completion(chat.json()["id"])
    assert logged["response"] == chat.json()["choices"][0]["message"]["content"] and logged["version"] == "v1"
    assert [f["kind"] for f in store.iter_feedback()] == ["thumbs", "correction"]
    store.close()
