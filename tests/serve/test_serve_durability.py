"""`posttrain serve` as a real process: many concurrent clients' completions and feedback are all in the store,
and a server SIGKILLed in the middle of a stream loses no write it had acknowledged."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("uvicorn")

KEY = "durability-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_acknowledged_writes_survive_concurrency_and_a_kill_mid_stream(tiny_model_dir, tmp_path):
    from posttrain.feedback.store import FeedbackStore

    port, db = _free_port(), f"sqlite:///{tmp_path / 'feedback.db'}"
    log = (tmp_path / "server.log").open("wb")  # a file, not a pipe: a full pipe would stall the server
    env = {**os.environ, "POSTTRAIN_API_KEY": KEY, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "posttrain", "serve", f"model={tiny_model_dir}", "model_name=tiny",
                               f"port={port}", f"db={db}", "log_level=warning"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.time() < deadline, "server did not start"
            time.sleep(0.5)

        headers = {"Authorization": f"Bearer {KEY}"}
        completions, acknowledged = [], []
        lock = threading.Lock()

        def client(i: int) -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
                for j in range(3):
                    r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "temperature": 0.7,
                                                             "messages": [{"role": "user", "content": f"hi {i} {j}"}]})
                    assert r.status_code == 200, r.text
                    cid = r.json()["id"]
                    f = c.post("/v1/feedback", json={"completion_id": cid, "rating": 1 + (i + j) % 5})
                    assert f.status_code == 200, f.text
                    with lock:
                        completions.append(cid)
                        acknowledged.append(f.json()["id"])

        with ThreadPoolExecutor(8) as pool:
            for fut in [pool.submit(client, i) for i in range(8)]:
                fut.result()
        assert len(acknowledged) == 24

        # A long stream; the server is killed once its first chunk has arrived.
        with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
            with c.stream("POST", "/v1/chat/completions", json={"model": "tiny", "max_tokens": 900, "stream": True,
                                                               "messages": [{"role": "user", "content": "go on"}]}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        json.loads(line[6:])
                        server.send_signal(signal.SIGKILL)
                        break
        server.wait(timeout=30)
        assert server.returncode == -signal.SIGKILL
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()

    with FeedbackStore(db) as store:
        stored = {item["id"] for item in store.iter_feedback(0)}
        assert set(acknowledged) <= stored and store.count_feedback(0) == len(acknowledged)
        assert all(store.get_completion(cid) is not None for cid in completions)
