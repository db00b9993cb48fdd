"""Bounded load test of `posttrain serve` on loopback, and the feedback store's write rate.

    python benchmarks/serve_load.py                       # embedded SmolLM2-135M, 1/8/32 clients, SQLite (+ PostgreSQL if POSTTRAIN_TEST_PG_URL)
    python benchmarks/serve_load.py --requests 32 --max-tokens 32 --clients 1,8,32 --out results.json
    python benchmarks/serve_load.py --engine builtin,vllm --batch-size 32 --skip-feedback   # both engines (vLLM: `make vllm`)

Part 1 (serving): a real uvicorn server in this process (auth on, feedback store on SQLite), `clients` threads
each sending chat completions (temperature 0.7, `--max-tokens`) until `--requests` are done; reports
requests/s, p50/p99 latency and generated tokens/s (from each response's `usage`) per concurrency level, for
each engine of `--engine` (`builtin`, `vllm`, or both: `builtin,vllm`). `--batch-size` is the server's
batch_size: the built-in engine's batch per adapter version, vLLM's max_num_seqs (continuous batching). The
built-in engine runs first: an in-process vLLM engine on a CPU pins torch to one thread for the rest of the
process (vLLM's CPU worker replaces torch.set_num_threads), which would slow a built-in run after it.

Part 2 (feedback writes): `--writers` threads each acknowledging `--writes` feedback items through the store
(the same code path `POST /v1/feedback` ends in), on SQLite (WAL, synchronous=FULL) and, when
`POSTTRAIN_TEST_PG_URL` is set (`.ci/postgres.sh start` prints one), PostgreSQL; then counts the stored items:
every acknowledged write must be there ("lost" must be 0).

Timings on a shared machine are noisy: compare levels within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTIONS = ["What is the capital of France?", "How much is 7 plus 5?", "Name a primary colour.",
             "What is the capital of Japan?", "Give me a synonym for happy.", "How many days are in a week?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def serve_load(model: str, clients: list[int], requests: int, max_tokens: int, batch_size: int, db: str,
               engine: str = "builtin", vllm_memory: float = 0.3) -> list[dict]:
    import httpx

    from posttrain.commands.serve import ServeConfig
    from posttrain.config import build
    from posttrain.demo.loop import Server, _free_port

    key = secrets.token_hex(8)
    os.environ["POSTTRAIN_API_KEY"] = key
    cfg = build(ServeConfig, {"model": model, "port": _free_port(), "db": db, "batch_size": batch_size,
                               "max_queue": max(64, max(clients) * 2), "log_level": "warning", "engine": engine,
                               "vllm": {"memory": vllm_memory}})
    cfg.validate()
    t0 = time.perf_counter()
    server = Server(cfg)
    print(f"[serve] engine {engine}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    name = server.registry.base_name
    results = []
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as warm:
            warm.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 4}).raise_for_status()
        for n in clients:
            row = {"engine": engine, **_level(server.url, key, name, n, requests, max_tokens)}
            print(f"[serve] {engine} {n:>3} clients: {row['requests_per_s']:.2f} req/s, p50 {row['p50_s']:.2f} s, p99 "
                  f"{row['p99_s']:.2f} s, {row['generated_tokens_per_s']:.1f} generated tok/s, {row['errors']} errors",
                  flush=True)
            results.append(row)
    finally:
        server.stop()
    return results


def _level(url: str, key: str, name: str, n: int, requests: int, max_tokens: int) -> dict:
    """``n`` client threads share ``requests`` chat completions; one row of the report."""
    import httpx

    latencies: list[float] = []
    tokens = errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def client_loop():
        nonlocal tokens, errors
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = c.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": max_tokens, "temperature": 0.7})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        tokens += r.json()["usage"]["completion_tokens"]
                    else:
                        errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(client_loop) for _ in range(n)]:
            f.result()
    wall = time.perf_counter() - t0
    return {"clients": n, "requests": len(latencies), "errors": errors, "seconds": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3), "p50_s": round(percentile(latencies, 0.5), 3),
            "p99_s": round(percentile(latencies, 0.99), 3), "generated_tokens_per_s": round(tokens / wall, 2)}


def feedback_writes(url: str, writers: int, writes: int) -> dict:
    from posttrain.feedback.store import FeedbackStore

    with FeedbackStore(url) as store:
        run = secrets.token_hex(4)
        for i in range(writers):
            store.log_completion(id=f"{run}-{i}", model="m", version="v", messages=[{"role": "user", "content": "q"}],
                                 response="a", sampling={})
        before = store.count_feedback(0)
        acknowledged: list[int] = []
        lock = threading.Lock()

        def writer(i: int):
            for j in range(writes):
                fid = store.add_feedback(completion_id=f"{run}-{i}", kind="rating", value=1 + j % 5)
                with lock:
                    acknowledged.append(fid)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(writers) as pool:
            for f in [pool.submit(writer, i) for i in range(writers)]:
                f.result()
        wall = time.perf_counter() - t0
        stored = {item["id"] for item in store.iter_feedback(0) if item["completion_id"].startswith(run)}
        lost = len(set(acknowledged) - stored)
        return {"backend": url.split(":")[0], "writers": writers, "acknowledged": len(acknowledged),
                "stored": store.count_feedback(0) - before, "lost": lost, "writes_per_s": round(len(acknowledged) / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="the server's batch_size (vLLM: max_num_seqs)")
    p.add_argument("--engine", default="builtin", help="builtin, vllm, or both: builtin,vllm")
    p.add_argument("--vllm-memory", type=float, default=0.3, help="engine=vllm: the share of memory vLLM reserves "
                   "(on a CPU, of RAM)")
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--writes", type=int, default=100, help="feedback writes per writer thread")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--skip-feedback", action="store_true", help="skip part 2 (feedback writes)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_serve:
            engines = [e.strip() for e in args.engine.split(",") if e.strip()]
            if not set(engines) <= {"builtin", "vllm"}:
                p.error(f"--engine: builtin and/or vllm, got {args.engine}")
            report["serve"] = []
            for engine in sorted(engines, key=["builtin", "vllm"].index):  # builtin first (module docstring)
                report["serve"] += serve_load(args.model, [int(c) for c in args.clients.split(",")], args.requests,
                                              args.max_tokens, args.batch_size, f"sqlite:///{Path(tmp) / f'{engine}.db'}",
                                              engine=engine, vllm_memory=args.vllm_memory)
        report["feedback"] = []
        if not args.skip_feedback:
            report["feedback"].append(feedback_writes(f"sqlite:///{Path(tmp) / 'fb.db'}", args.writers, args.writes))
            pg = os.environ.get("POSTTRAIN_TEST_PG_URL")
            if pg:
                report["feedback"].append(feedback_writes(pg, args.writers, args.writes))
            else:
                print("[feedback] PostgreSQL skipped: POSTTRAIN_TEST_PG_URL is not set (`.ci/postgres.sh start` prints one)")
    for r in report["feedback"]:
        print(f"[feedback] {r['backend']}: {r['writers']} writers, {r['acknowledged']} acknowledged, {r['stored']} stored, "
              f"{r['lost']} lost, {r['writes_per_s']:.0f} writes/s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if all(r["lost"] == 0 for r in report["feedback"]) else 1


if __name__ == "__main__":
    sys.exit(main())
