"""The generation worker: one thread owns the model; requests queue for it and run in batches.

Design:
1. **One model thread.** Every forward pass and every change to the model (loading or deleting an adapter) runs
   on this thread, so nothing touches PEFT's modules concurrently. Model changes are *calls* queued with
   :meth:`GenerationWorker.call`; they run between batches, before waiting requests.
2. **Batches by group.** The worker takes the oldest waiting request and up to ``batch_size - 1`` more waiting
   requests of the same group (the same adapter version), in arrival order; the others keep their place. Requests
   that arrive while a batch decodes wait for the next batch (static batching: a batch runs until its last row
   ends, though finished rows stop costing compute).
3. **Bounded queue.** At most ``max_queue`` requests wait; :meth:`submit` raises :class:`QueueFull` beyond that,
   which the server answers with 503. A batch that fails (out of memory, a bug) fails its requests, not the
   process.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from posttrain.serve.decode import Failed, Job

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More than ``max_queue`` requests are waiting."""


class GenerationWorker:
    def __init__(self, run_batch: Callable[[list[Job]], None], *, batch_size: int, max_queue: int,
                 between_batches: Callable[[], None] | None = None):
        assert batch_size >= 1 and max_queue >= 1
        self.run_batch, self.between_batches = run_batch, between_batches
        self.batch_size, self.max_queue = batch_size, max_queue
        self._waiting: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run (for tests and logs)
        self.largest_batch = 0

    def start(self) -> None:
        assert self._thread is None, "worker already started"
        self._thread = threading.Thread(target=self._loop, name="posttrain-generation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the generation worker has stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue={self.max_queue})")
            self._waiting.append(job)
            self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread between batches and return its result (or raise its exception)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the generation worker has stopped")
            self._calls.append((fn, future))
            self._cond.notify()
        return future.result()

    def wake(self) -> None:
        """Run ``between_batches`` soon even when no request is waiting."""
        with self._cond:
            self._cond.notify()

    def _next_batch(self) -> list[Job]:
        head = self._waiting.popleft()
        batch, rest = [head], deque()
        while self._waiting:
            job = self._waiting.popleft()
            if len(batch) < self.batch_size and job.group == head.group:
                batch.append(job)
            else:
                rest.append(job)
        self._waiting = rest
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._calls or self._stopping, timeout=1.0)
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
                batch = self._next_batch() if self._waiting and not calls else []
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller, who raises it
                    future.set_exception(e)
            if batch:
                self._run(batch)
            if self.between_batches is not None:
                self.between_batches()
        with self._cond:  # fail whatever is still waiting
            for job in self._waiting:
                job.emit(Failed("the server is shutting down"))
            for _, future in self._calls:
                future.set_exception(RuntimeError("the server is shutting down"))

    def _run(self, batch: list[Job]) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            self.run_batch(batch)
        except Exception as e:
            log.exception("generation failed for a batch of %d requests", len(batch))
            for job in batch:
                job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
