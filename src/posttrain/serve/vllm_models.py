"""``posttrain serve engine=vllm``: the model registry of :mod:`.models` over vLLM's engine (continuous batching,
multi-LoRA), behind the same app, keys, limits, completion log, feedback and hot swap.

Design:
1. **One engine thread.** A ``vllm.v1.engine.llm_engine.LLMEngine`` is built *and* stepped on one background
   thread (:class:`VLLMWorker`), with vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
   each ``step()`` schedules and runs the model in the calling thread). vLLM's asynchronous ``AsyncLLM`` was not
   used: it always runs the engine core in a second process (vLLM refuses asyncio without multiprocessing), which
   on a small machine competes for the cores, and its outputs would still need bridging to the app's event loop.
   Building the engine on the thread that steps it keeps vLLM's CPU thread binding (OpenMP threads pinned to cores
   at start-up) on the thread that computes.
   Every call into the engine (``add_request``, ``abort_request``, ``step``, ``add_lora``, ``remove_lora``) runs
   on that thread; other threads queue calls (:meth:`VLLMWorker.call`), like the built-in worker's model thread.
2. **Continuous batching.** Up to ``batch_size`` requests (vLLM's ``max_num_seqs``) of any versions are in the
   engine at once; a request joins at the next step and leaves when it ends. At most ``max_queue`` more wait in
   posttrain's queue (beyond: :class:`~posttrain.serve.worker.QueueFull`, a 503), so a cancelled request that
   never started costs nothing.
3. **Same text semantics as the built-in engine.** vLLM returns each step's new token ids (``output_kind=DELTA``,
   ``detokenize=False``); they go through :class:`~posttrain.serve.decode.TextStream`, the built-in engine's
   incremental detokeniser and stop-string matcher, so deltas never contain a stop string and concatenate to the
   final text, EOS (``stop_token_ids``: the tokenizer's and generation_config's) ends a row the same way, and
   ``completion_tokens`` counts the same tokens. A stop string ends the vLLM request with ``abort_request``.
   Temperatures below :data:`~posttrain.serve.decode.GREEDY_BELOW` are greedy (temperature 0 for vLLM).
4. **Versions are LoRA adapters in the running engine.** Each loaded version gets a fresh integer id and a
   ``LoRARequest(key, id, path)``; the engine loads it (``add_lora``) before the name switches, requests carry
   their lease's ``LoRARequest``, and a retired version is removed (``remove_lora``) once its last lease ends.
   vLLM serves plain LoRA only: DoRA adapters, LoRA on stacked MoE expert parameters and ranks above
   ``vllm.max_lora_rank`` are refused with a ConfigError.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from posttrain.errors import ConfigError
from posttrain.serve.decode import GREEDY_BELOW, Delta, Event, Failed, Finished, Job, RowSampling, TextStream
from posttrain.serve.models import (
    LoadedAdapter,
    VersionTable,
    _dtype,
    _registry_version,
    check_lora_dir,
    load_versions,
)
from posttrain.serve.worker import QueueFull

if TYPE_CHECKING:
    from posttrain.commands.serve import ServeConfig

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    """A request inside the engine."""

    job: Job
    stream: TextStream


class VLLMWorker:
    """The engine thread (module point 1): builds the engine with ``build()``, then admits queued jobs, steps the
    engine and emits each job's events. ``params(sampling)`` gives a job's vLLM SamplingParams, ``lora(job)`` its
    LoRARequest or None, ``done(job)`` is called once a job has ended (its lease is released there)."""

    def __init__(self, build: Callable[[], Any], tokenizer, eos_ids: list[int], *, batch_size: int, max_queue: int,
                 params: Callable[[RowSampling], Any], lora: Callable[[Job], Any], done: Callable[[Job], None],
                 between_steps: Callable[[], None] | None = None):
        assert batch_size >= 1 and max_queue >= 1
        self.tokenizer, self.eos = tokenizer, set(eos_ids)
        self.batch_size, self.max_queue = batch_size, max_queue
        self.params, self.lora, self.done, self.between_steps = params, lora, done, between_steps
        self.engine = None
        self._waiting: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._running: dict[str, _Row] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._started = self._stopping = False
        self.steps = 0  # engine steps run (for tests and logs)
        self.largest_batch = 0  # most requests in the engine at once
        ready: Future = Future()
        self._thread = threading.Thread(target=self._main, args=(build, ready), name="posttrain-vllm", daemon=True)
        self._thread.start()
        ready.result()  # the engine is built, or its error is raised here

    # ------------------------------------------------------------------------------------------ other threads
    def start(self) -> None:
        """Start generating (calls run from construction on; requests queue until this)."""
        with self._cond:
            self._started = True
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
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
        """Run ``fn`` on the engine thread between steps and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the generation worker has stopped")
            self._calls.append((fn, future))
            self._cond.notify()
        return future.result()

    def wake(self) -> None:
        """Run ``between_steps`` soon even when no request is waiting."""
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------------------------------ engine thread
    def _main(self, build: Callable[[], Any], ready: Future) -> None:
        try:
            self.engine = build()
        except BaseException as e:  # raised in the constructor's thread
            ready.set_exception(e)
            return
        ready.set_result(None)
        try:
            self._loop()
        except BaseException:  # a bug in this loop: log it, fail what waits, refuse new requests rather than queue them
            log.exception("the vLLM engine thread failed")
            raise
        finally:
            with self._cond:
                self._stopping = True
            self._shutdown()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._calls or self._running
                                    or (self._started and self._waiting), timeout=1.0)
                if self._stopping:
                    return
                calls = list(self._calls)
                self._calls.clear()
                new = []
                while self._started and self._waiting and len(self._running) + len(new) < self.batch_size:
                    new.append(self._waiting.popleft())
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller, who raises it
                    future.set_exception(e)
            for job in new:
                self._admit(job)
            for request_id, row in list(self._running.items()):
                if row.job.cancelled.is_set():  # the client went away
                    self._abort(request_id)
                    self._end(row.job, Finished("cancelled", len(row.stream.ids)))
            if self.between_steps is not None:
                self.between_steps()
            if self._running:
                self._step()

    def _admit(self, job: Job) -> None:
        from vllm.inputs import TokensPrompt

        if job.cancelled.is_set():
            self._end(job, Finished("cancelled", 0))
            return
        request_id = f"r{next(self._ids)}"
        try:
            self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(job.prompt_ids)),
                                    self.params(job.sampling), lora_request=self.lora(job))
        except ValueError as e:  # vLLM's input validation (e.g. over max_model_len): this request only
            self._end(job, Failed(f"generation failed: {e}", status=400))
            return
        except Exception as e:
            log.exception("vLLM refused a request")
            self._end(job, Failed(f"generation failed: {type(e).__name__}: {e}"))
            return
        self._running[request_id] = _Row(job, TextStream(self.tokenizer, job.sampling.stop))
        self.largest_batch = max(self.largest_batch, len(self._running))

    def _step(self) -> None:
        self.steps += 1
        try:
            outputs = self.engine.step()
        except Exception as e:  # the engine failed: every request in it fails, the server stays up
            log.exception("vLLM's engine step failed with %d requests in it", len(self._running))
            for request_id, row in list(self._running.items()):
                with contextlib.suppress(Exception):
                    self._abort(request_id)
                self._end(row.job, Failed(f"generation failed: {type(e).__name__}: {e}"))
            return
        for out in outputs:
            row = self._running.get(out.request_id)
            if row is not None:
                self._emit(out.request_id, row, out)

    def _emit(self, request_id: str, row: _Row, out) -> None:
        """Feed a request's new tokens through its TextStream (module point 3) and emit what became final."""
        job, stream = row.job, row.stream
        completion = out.outputs[0]
        pieces, finish = [], None
        try:
            for token in completion.token_ids:
                if token in self.eos:
                    stream.ids.append(token)
                    pieces.append(stream.flush())
                    finish = "stop"
                    break
                piece, stopped = stream.push(token)
                pieces.append(piece)
                if stopped:
                    finish = "stop"
                    break
                if len(stream.ids) >= job.sampling.max_tokens:
                    pieces.append(stream.flush())
                    finish = "length"
                    break
            if finish is None and out.finished:  # vLLM ended it on its own (an EOS it knows of, its length cap)
                pieces.append(stream.flush())
                finish = "length" if completion.finish_reason == "length" else "stop"
        except Exception as e:  # this request's text handling: fail it alone
            self._abort(request_id, finished=out.finished)
            self._end(job, Failed(f"generation failed: {type(e).__name__}: {e}"))
            return
        text = "".join(pieces)
        if text:
            job.emit(Delta(text))
        if finish is not None:
            self._abort(request_id, finished=out.finished)
            self._end(job, Finished(finish, len(stream.ids)))

    def _abort(self, request_id: str, finished: bool = False) -> None:
        self._running.pop(request_id, None)
        if not finished:
            self.engine.abort_request([request_id])

    def _end(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        finally:
            self.done(job)

    def _shutdown(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            calls = list(self._calls)
            self._calls.clear()
        for job in [row.job for row in self._running.values()] + waiting:
            self._end(job, Failed("the server is shutting down"))
        self._running.clear()
        for _, future in calls:
            future.set_exception(RuntimeError("the server is shutting down"))
        with contextlib.suppress(Exception):
            self.engine.engine_core.shutdown()
        self.engine = None


def _eos_ids(tokenizer, model_path: str) -> list[int]:
    """The tokenizer's EOS and the model's generation_config ones (the built-in engine's set)."""
    from transformers import GenerationConfig

    from posttrain.models.loading import eos_token_ids

    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json
        generation = None
    return eos_token_ids(tokenizer, SimpleNamespace(generation_config=generation))


def _lora_rank(config) -> int:
    return max([int(config.r), *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values())])


def _check_for_vllm(config, adapter_dir: str, max_rank: int) -> None:
    """What vLLM cannot serve (module point 4)."""
    from posttrain.vllm_backend import check_adapter

    check_adapter(config, what=f"adapter: '{adapter_dir}'", instead="serve it with engine=builtin")
    rank = _lora_rank(config)
    if max_rank and rank > max_rank:
        raise ConfigError(f"adapter: '{adapter_dir}' has LoRA rank {rank}, over this engine's vllm.max_lora_rank="
                          f"{max_rank}; restart the server with vllm.max_lora_rank={rank} or more")


class VLLMModelRegistry(VersionTable):
    """Model names -> versions and their leases (shared with the built-in engine's :class:`ModelRegistry`), over
    a vLLM engine owned by a :class:`VLLMWorker` (module docstring)."""

    engine = "vllm"

    def __init__(self, build: Callable[[], Any], tokenizer, *, base_name: str, eos_ids: list[int],
                 batch_size: int = 8, max_queue: int = 64, max_lora_rank: int = 0):
        """``build()`` returns the LLMEngine (called on the engine thread); ``max_lora_rank`` 0: LoRA is off."""
        super().__init__(base_name)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_lora_rank = max_lora_rank
        self._loras: dict[LoadedAdapter, Any] = {}  # loaded versions -> their LoRARequest
        self.worker = VLLMWorker(build, tokenizer, eos_ids, batch_size=batch_size, max_queue=max_queue,
                                 params=self._params, lora=self._lora_of, done=lambda job: self.release(job.lease),
                                 between_steps=self._remove_retired)
        self.context_length: int | None = self.worker.engine.model_config.max_model_len

    @classmethod
    def load(cls, cfg: ServeConfig) -> VLLMModelRegistry:
        """Build the engine for ``cfg.model`` and load ``cfg.adapters`` (and the loop registry's version) into it;
        requests wait until :meth:`start`."""
        from posttrain.models.loading import load_config, load_tokenizer, resolve_model
        from posttrain.vllm_backend import (
            VLLMSection,
            engine_kwargs,
            in_process,
            require_vllm,
            vllm_lora_rank,
        )

        require_vllm("serve engine=vllm")
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        path = resolve_model(cfg.model)
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        section = cfg.vllm
        lora = bool(cfg.adapters) or bool(cfg.registry)
        rank = 0
        if lora:  # the ranks of what serves at start-up: adapters= and the loop registry's version
            dirs = [spec if isinstance(spec, str) else spec["adapter"] for spec in cfg.adapters.values()]
            _, from_registry = _registry_version(cfg)
            dirs += [from_registry["adapter"]] if from_registry is not None else []
            ranks = [_lora_rank(check_lora_dir(d)) for d in dirs]
            wanted = section.max_lora_rank or max([16, *ranks])
            rank = vllm_lora_rank(wanted)
        context = getattr(load_config(path, cfg.trust_remote_code), "max_position_embeddings", None)
        limits = cfg.max_prompt_tokens + cfg.max_tokens_limit
        dtype = str(_dtype(cfg.dtype)).removeprefix("torch.")
        kw = engine_kwargs(path, VLLMSection(memory=section.memory, kv_cache_gb=section.kv_cache_gb,
                                             max_model_len=section.max_model_len, enforce_eager=section.enforce_eager,
                                             max_lora_rank=rank),
                           dtype=dtype, max_model_len=min(context, limits) if context else limits, seed=cfg.seed,
                           lora_rank=rank or None, trust_remote_code=cfg.trust_remote_code,
                           max_loras=section.max_loras, max_num_seqs=cfg.batch_size, logprobs=False)
        if lora:  # every served version (and retired ones still answering) stays in CPU memory
            kw["max_cpu_loras"] = section.max_loras + cfg.max_served_names + 2

        def build():
            with in_process():
                return LLMEngine.from_engine_args(EngineArgs(**kw))

        base_name = cfg.model_name or Path(cfg.model.rstrip("/")).name
        registry = cls(build, tokenizer, base_name=base_name, eos_ids=_eos_ids(tokenizer, path),
                       batch_size=cfg.batch_size, max_queue=cfg.max_queue, max_lora_rank=rank)
        try:
            load_versions(registry, cfg)
        except BaseException:
            registry.stop()
            raise
        return registry

    def _params(self, sampling: RowSampling):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = sampling.temperature < GREEDY_BELOW
        return SamplingParams(max_tokens=sampling.max_tokens, temperature=0.0 if greedy else sampling.temperature,
                              top_p=1.0 if greedy else sampling.top_p, stop_token_ids=list(self.eos_ids),
                              detokenize=False, output_kind=RequestOutputKind.DELTA)

    def _lora_of(self, job: Job):
        return None if job.group is None else self._loras[job.group]

    # ------------------------------------------------------------------------------------------ hot swap
    def set_version(self, name: str, adapter_dir: str, version: str) -> str | None:
        """Serve the LoRA adapter in ``adapter_dir`` as ``name`` from the next request on: loaded into the running
        engine under a fresh id, then the name switches (see :mod:`.models`). Returns the version served before, or
        None for a new name."""
        from vllm.lora.request import LoRARequest

        self._check_name(name, version)
        config = check_lora_dir(adapter_dir)
        if not self.max_lora_rank:
            raise ConfigError("adapter: this vLLM engine was started without LoRA (no adapters= and no registry=); "
                              "restart it with an adapter or a registry to serve adapters")
        _check_for_vllm(config, adapter_dir, self.max_lora_rank)
        number = next(self._keys)
        adapter = LoadedAdapter(key=f"adapter_{number}", version=version, path=str(adapter_dir))
        request = LoRARequest(adapter.key, number + 1, str(Path(adapter_dir).resolve()))  # vLLM ids start at 1

        def load():
            try:
                self.worker.engine.add_lora(request)
            except Exception as e:  # a broken adapter must not take the server down
                with contextlib.suppress(Exception):
                    self.worker.engine.remove_lora(request.lora_int_id)
                raise ConfigError(f"adapter: vLLM could not load '{adapter_dir}': {type(e).__name__}: "
                                  f"{str(e)[:300]}") from e
            self._loras[adapter] = request

        self.worker.call(load)
        return self._publish(name, adapter)

    def loaded_adapters(self) -> list[str]:
        """Internal names of the adapters loaded in the engine (retired ones included until their leases end)."""
        return [a.key for a in list(self._loras)]

    def _remove_retired(self) -> None:
        for adapter in self._unleased_retired():
            request = self._loras.pop(adapter, None)
            if request is not None:
                with contextlib.suppress(Exception):  # already evicted from vLLM's cache: nothing to remove
                    self.worker.engine.remove_lora(request.lora_int_id)
