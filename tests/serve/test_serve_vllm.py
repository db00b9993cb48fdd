"""`posttrain serve engine=vllm` over a real socket with the official client: the built-in server's API tests
against vLLM's engine (one server for the module), and its greedy output checked against the built-in engine's.

Needs vLLM (`make vllm`); skipped without it. vLLM's CPU attention refuses head_dim 16, so the tiny random Llama
here has 2 heads of 32 (the suite's tiny model has 16); its weights are drawn with a large init range so that
greedy decoding has clear margins between the top two tokens (about 0.1 in logits, where the two engines' float32
logits differ by about 1e-5) and text that varies from token to token.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytestmark = [pytest.mark.vllm]
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from posttrain.commands.serve import ServeConfig, ServeSamplingSection, ServeVLLMSection  # noqa: E402
from posttrain.errors import ConfigError  # noqa: E402
from posttrain.generation import encode_prompt  # noqa: E402
from posttrain.loop.registry import Registry  # noqa: E402
from posttrain.serve import load_registry  # noqa: E402
from posttrain.serve.app import create_app  # noqa: E402
from posttrain.serve.decode import Delta, RowSampling  # noqa: E402
from posttrain.serve.models import ModelRegistry  # noqa: E402
from tests.serving import HELLO, KEY, FakeStore, Server, save_lora  # noqa: E402

ADMIN = "admin-key"
PROMPTS = ["Say something.", "Question 3?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama vLLM can run on a CPU: hidden 64 in 2 heads of 32, 2 layers (module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=1.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-llama-hd32")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return save_lora(model_dir, root / "a", 1), save_lora(model_dir, root / "b", 2)


@pytest.fixture(scope="module")
def loop_registry(adapters, tmp_path_factory):
    """The loop's registry: v0 (adapter a) serving; the hot-swap test registers and approves v1 (adapter b)."""
    reg = Registry(tmp_path_factory.mktemp("loop") / "registry")
    v0 = reg.register(adapters[0], parent=None)
    reg.decide(v0, True, ["initial version"], {})
    reg.confirm(v0, "test")
    return reg


@pytest.fixture(scope="module")
def srv(model_dir, adapters, loop_registry):
    cfg = ServeConfig(model=str(model_dir), model_name="tiny", dtype="float32", engine="vllm",
                      vllm=ServeVLLMSection(memory=0.1, max_loras=4),
                      adapters={"other": {"adapter": adapters[1], "version": "b1"}}, registry=str(loop_registry.root),
                      registry_model="assistant", max_tokens_limit=256, max_body_bytes=20_000,
                      sampling=ServeSamplingSection(max_tokens=8))
    t0 = time.perf_counter()
    registry = load_registry(cfg)
    load_s = time.perf_counter() - t0
    registry.start()
    store = FakeStore()
    s = Server(create_app(registry, store, cfg, [KEY, "second-key"], [ADMIN]), registry, store, cfg)
    s.load_s = load_s
    yield s
    s.close()


@pytest.fixture
def slow_steps(srv):
    """Each engine step takes at least 10 ms while the test runs, so a long request is surely still generating
    when the test acts on it (the tiny model decodes a token in about a millisecond)."""
    worker = srv.registry.worker
    original = worker.between_steps

    def slowed():
        original()
        time.sleep(0.01)

    worker.between_steps = slowed
    yield
    worker.between_steps = original


def _run(registry, lease, prompt, max_tokens):
    """Greedy text and last event of one request submitted to ``registry`` directly, on ``lease``."""
    done, pieces, events = threading.Event(), [], []

    def emit(event):
        if isinstance(event, Delta):
            pieces.append(event.text)
        else:
            events.append(event)
            done.set()

    registry.submit(lease, encode_prompt(registry.tokenizer, [{"role": "user", "content": prompt}]),
                    RowSampling(max_tokens=max_tokens, temperature=0, top_p=1), emit)
    assert done.wait(30)
    return "".join(pieces), events[0]


def _greedy(client, model, content="Say something.", max_tokens=12, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=max_tokens, **kw)


# ------------------------------------------------------------------------------------------ the official client
def test_openai_client_chat_stream_and_models(srv, capsys):
    client = srv.client()
    t0 = time.perf_counter()
    first = _greedy(client, "tiny", max_tokens=4)
    with capsys.disabled():
        print(f"\n[vllm serve] engine built and adapters loaded in {srv.load_s:.1f} s; first request "
              f"{time.perf_counter() - t0:.2f} s")
    assert first.choices[0].message.content is not None
    assert srv.http.get("/health").json()["engine"] == "vllm"
    models = {m.id: m.to_dict()["version"] for m in client.models.list()}
    assert models == {"tiny": "base", "assistant": "v0", "other": "b1"}

    r = _greedy(client, "assistant")
    text = r.choices[0].message.content
    assert r.id.startswith("chatcmpl-") and r.model == "assistant" and r.system_fingerprint == "v0"
    assert text and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    logged = srv.store.completions[r.id]
    assert logged["response"] == text and logged["version"] == "v0" and logged["model"] == "assistant"
    assert logged["messages"] == HELLO and logged["sampling"]["temperature"] == 0

    chunks = list(client.chat.completions.create(model="assistant", messages=HELLO, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # token by token
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[-1].usage.completion_tokens == 12
    assert srv.store.completions[chunks[0].id]["response"] == text

    # a LoRA adapter changes the output: the base model and the other adapter answer differently
    assert _greedy(client, "tiny").choices[0].message.content != text
    assert _greedy(client, "other").choices[0].message.content != text


def test_greedy_output_equals_the_builtin_engines(srv, model_dir, adapters):
    client = srv.client()
    a, b = adapters
    cfg = ServeConfig(model=str(model_dir), model_name="tiny", dtype="float32",
                      adapters={"assistant": {"adapter": a, "version": "v0"}, "other": {"adapter": b, "version": "b1"}})
    builtin = ModelRegistry.load(cfg)
    builtin.start()
    try:
        for name in ("tiny", "assistant", "other"):
            for prompt in PROMPTS:
                text, finished = _run(builtin, builtin.acquire(name), prompt, max_tokens=16)
                r = _greedy(client, name, prompt, max_tokens=16)
                assert r.choices[0].message.content == text, (name, prompt)
                assert r.usage.completion_tokens == finished.completion_tokens
    finally:
        builtin.stop()


def test_auth_and_the_admin_key(srv):
    with pytest.raises(openai.AuthenticationError):
        srv.client(key="wrong").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    r = srv.http.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert srv.client(key="second-key").models.list().data
    body = {"model": "assistant", "version": "v0"}
    assert srv.post("/v1/admin/versions", body).json()["error"]["code"] == "admin_key_required"  # a user key: 403
    assert srv.post("/v1/admin/versions", body, key=None).status_code == 401
    assert srv.post("/v1/admin/versions", body, key="guess").status_code == 401
    r = srv.post("/v1/admin/versions", {"model": "assistant", "version": "v7"}, key=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"


def test_bad_requests_get_4xx(srv):
    def error(r, status):
        assert r.status_code == status, r.text
        return r.json()["error"]

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert "malformed JSON" in error(srv.http.post("/v1/chat/completions", content=b'{"model": "tiny", mess',
                                                headers=headers), 400)["message"]
    e = error(srv.post("/v1/chat/completions", {"model": "nope", "messages": HELLO}), 404)
    assert e["code"] == "model_not_found" and "assistant" in e["message"]
    assert error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "max_tokens": 257}),
                 400)["param"] == "max_tokens"
    assert error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "n": 2}), 400)
    long = [{"role": "user", "content": "hello " * 900}]  # within max_prompt_tokens, over vLLM's max_model_len
    e = error(srv.post("/v1/chat/completions", {"model": "tiny", "messages": long, "max_tokens": 200}), 400)
    assert "context of 1024 tokens" in e["message"]
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert error(srv.post("/v1/chat/completions", big), 413)["code"] == "request_too_large"


def test_lora_adapters_vllm_cannot_serve_are_refused(srv, model_dir, adapters, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dora = tmp_path / "dora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                   LoraConfig(r=8, target_modules=["q_proj"], use_dora=True)).save_pretrained(dora)
    with pytest.raises(ConfigError, match="vLLM has no DoRA"):
        srv.registry.set_version("assistant", str(dora), "dora")
    wide = tmp_path / "wide"
    shutil.copytree(adapters[0], wide)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 64}))
    with pytest.raises(ConfigError, match="max_lora_rank"):
        srv.registry.set_version("assistant", str(wide), "wide")
    with pytest.raises(ConfigError, match="not a PEFT adapter directory"):
        srv.registry.set_version("assistant", "/nonexistent", "v9")
    with pytest.raises(ConfigError, match="is the base model"):
        srv.registry.set_version("tiny", str(adapters[0]), "v9")
    assert srv.registry.served()["assistant"] == "v0"


# ------------------------------------------------------------------------------------------ text
def test_stop_strings_cut_the_text(srv):
    client = srv.client()
    full = _greedy(client, "tiny", max_tokens=24).choices[0].message.content
    stop = full[8:11]
    assert len(stop) == 3 and stop.strip()
    expected = full[: full.index(stop)]
    r = _greedy(client, "tiny", max_tokens=24, stop=[stop, "never-seen"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(_greedy(client, "tiny", max_tokens=24, stop=[stop], stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == expected and not any(stop in d for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------------ log and feedback
def test_completion_log_and_feedback(srv, tmp_path):
    from posttrain.feedback.store import FeedbackStore

    client = srv.client()
    first, second = _greedy(client, "assistant"), _greedy(client, "other")
    for body in ({"thumbs": "up", "comment": "nice"}, {"rating": 4}, {"preferred_over": second.id},
                 {"correction": "A better answer."}):
        r = srv.post("/v1/feedback", {"completion_id": first.id, **body})
        assert r.status_code == 200 and r.json()["status"] == "recorded", r.text
    assert [f["kind"] for f in srv.store.feedback if f["completion_id"] == first.id] == [
        "thumbs", "rating", "preference", "correction"]
    assert srv.store.completions[second.id]["version"] == "b1"

    # the real store, reopened: what was acknowledged is there
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    app = create_app(srv.registry, store, srv.cfg, [KEY])

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            chat = await c.post("/v1/chat/completions", json={"model": "assistant", "messages": HELLO,
                                                              "temperature": 0})
            thumbs = await c.post("/v1/feedback", json={"completion_id": chat.json()["id"], "thumbs": "down"})
            return chat, thumbs

    chat, thumbs = asyncio.run(go())
    assert chat.status_code == 200 and thumbs.status_code == 200
    store.close()
    again = FeedbackStore(url)
    logged = again.get_completion(chat.json()["id"])
    assert logged["response"] == chat.json()["choices"][0]["message"]["content"] and logged["version"] == "v0"
    assert logged["model"] == "assistant" and [f["kind"] for f in again.iter_feedback()] == ["thumbs"]
    again.close()


# ------------------------------------------------------------------------------------------ batching, cancels
def test_many_concurrent_clients_run_in_one_batch(srv):
    client = srv.client()

    def one(i):
        r = client.chat.completions.create(model=["assistant", "other", "tiny"][i % 3], max_tokens=6,
                                           messages=[{"role": "user", "content": f"Question {i}?"}])
        return r, srv.post("/v1/feedback", {"completion_id": r.id, "rating": 1 + i % 5})

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    assert all(r.choices[0].message.content is not None and ack.status_code == 200 for r, ack in results)
    assert len({r.id for r, _ in results}) == 24
    assert srv.registry.worker.largest_batch > 1  # requests of several versions decoded together


def test_full_queue_is_503_and_a_disconnect_stops_generation(srv, slow_steps):
    worker = srv.registry.worker
    gate, blocked = threading.Event(), threading.Event()
    holder = threading.Thread(target=worker.call, args=(lambda: (blocked.set(), gate.wait(30)),))
    holder.start()
    assert blocked.wait(10)  # the engine thread waits: nothing is admitted
    max_queue, worker.max_queue = worker.max_queue, 1
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(srv.post, "/v1/chat/completions", {"model": "tiny", "messages": HELLO})
            while worker.queued() < 1:
                time.sleep(0.01)
            r = srv.post("/v1/chat/completions", {"model": "tiny", "messages": HELLO})
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
            gate.set()
            assert waiting.result(30).status_code == 200
    finally:
        worker.max_queue = max_queue
        gate.set()
        holder.join(10)

    body = {"model": "tiny", "messages": HELLO, "max_tokens": 256, "temperature": 0, "stream": True}
    seen, steps = "", None
    with srv.http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                chunk = json.loads(line[5:])
                seen += chunk["choices"][0]["delta"].get("content", "")
                if seen:
                    steps = worker.steps
                    break  # hang up mid-stream
    deadline = time.time() + 10
    while chunk["id"] not in srv.store.completions or worker._running:
        assert time.time() < deadline, "a disconnected stream was not logged, or its request still runs"
        time.sleep(0.02)
    assert worker.steps - steps < 100  # aborted in the engine, not generated to its 256 tokens
    logged = srv.store.completions[chunk["id"]]
    assert logged["sampling"]["finish_reason"] == "disconnected" and logged["response"].startswith(seen)


# ------------------------------------------------------------------------------------------ hot swap
def test_hot_swap_while_a_request_is_in_flight(srv, loop_registry, adapters, slow_steps):
    client = srv.client()
    text_a = _greedy(client, "assistant").choices[0].message.content
    text_b = _greedy(client, "other").choices[0].message.content
    assert text_a != text_b
    v1 = loop_registry.register(adapters[1], parent="v0")
    loop_registry.decide(v1, True, ["pass: reward"], {})
    assert srv.registry.served()["assistant"] == "v0" and len(srv.registry.loaded_adapters()) == 2

    in_flight, started, swapped = {}, threading.Event(), threading.Event()

    def stream_long():
        chunks, after = [], 0
        for chunk in client.chat.completions.create(model="assistant", messages=HELLO, temperature=0,
                                                    max_tokens=200, stream=True):
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
                after += swapped.is_set()
        in_flight.update(text="".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                         versions={c.system_fingerprint for c in chunks}, after_swap=after,
                         finish=chunks[-1].choices[0].finish_reason)

    thread = threading.Thread(target=stream_long)
    held = srv.registry.acquire("assistant")  # a request admitted before the swap, not yet submitted
    thread.start()
    assert started.wait(30)  # the stream is generating...
    r = srv.post("/v1/admin/versions", {"model": "assistant", "version": v1, "reason": "test"}, key=ADMIN)
    swapped.set()
    assert r.status_code == 200 and r.json()["previous_version"] == "v0"  # ...when the swap happens
    assert "v0" in [row.job.lease.version for row in list(srv.registry.worker._running.values())]  # still running
    assert len(srv.registry.loaded_adapters()) == 3  # v0 stays loaded while its requests run
    thread.join(30)
    assert in_flight["versions"] == {"v0"} and in_flight["text"].startswith(text_a)
    assert in_flight["after_swap"] > 0 and in_flight["finish"] == "length"  # it went on generating on v0

    r = _greedy(client, "assistant")
    assert r.system_fingerprint == v1 and r.choices[0].message.content == text_b
    assert {m.id: m.to_dict()["version"] for m in client.models.list()}["assistant"] == v1
    assert _run(srv.registry, held, HELLO[0]["content"], max_tokens=12)[0] == text_a  # the held lease: v0...
    deadline = time.time() + 5
    while len(srv.registry.loaded_adapters()) != 2:  # ...then v0 leaves the engine
        assert time.time() < deadline, srv.registry.loaded_adapters()
        time.sleep(0.02)


def test_cli_serve_engine_vllm(model_dir, tmp_path):
    """`posttrain serve engine=vllm` from the command line, in its own process, answers the official client."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, POSTTRAIN_API_KEY="cli-key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "serve", "engine=vllm", f"model={model_dir}", "model_name=tiny",
         f"port={port}", f"db=sqlite:///{tmp_path / 'fb.db'}", "vllm.memory=0.1", "log_level=warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("engine") == "vllm":
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=5)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
