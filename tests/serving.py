"""Test helpers for `posttrain serve`: an in-memory store, LoRA adapters on the tiny model, a server on a socket."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import torch
import uvicorn

from posttrain.feedback.store import UnknownCompletion
from posttrain.serve import uvicorn_config

KEY = "test-key"
HELLO = [{"role": "user", "content": "Say something."}]


class FakeStore:
    """In-memory stand-in with the FeedbackStore interface the server uses."""

    def __init__(self):
        self.completions: dict[str, dict] = {}
        self.feedback: list[dict] = []
        self.lock = threading.Lock()

    def log_completion(self, *, id, model, version, messages, response, sampling, created=None, owner=None):
        with self.lock:
            assert id not in self.completions, f"{id} logged twice"
            self.completions[id] = {"model": model, "version": version, "messages": messages, "response": response,
                                    "sampling": sampling, "created": created, "owner": owner}

    def add_feedback(self, *, completion_id, kind, value, comment=None, owner=None):
        with self.lock:
            if kind == "rating" and not 1 <= value <= 5:
                raise ValueError(f"value: a rating is an integer from 1 to 5, got {value!r}")
            for cid in (completion_id, value) if kind == "preference" else (completion_id,):
                if cid not in self.completions or owner not in (None, self.completions[cid]["owner"]):
                    raise UnknownCompletion(cid)
            self.feedback.append({"completion_id": completion_id, "kind": kind, "value": value, "comment": comment})
            return len(self.feedback)


def save_lora(model_dir, out, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(out)
    return str(out)


class Server:
    def __init__(self, app, registry, store, cfg):
        self.registry, self.store, self.cfg = registry, store, cfg
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, cfg, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.http = httpx.Client(base_url=self.url, timeout=60)  # one client: each new one builds an SSL context
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def get(self, path, key=KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.http.get(path, headers=headers, **kw)

    def post(self, path, body=None, key=KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.http.post(path, json=body, headers=headers, **kw)

    def close(self):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.registry.stop()
