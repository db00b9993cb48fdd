"""The served models: one base model in memory, any number of LoRA adapters on it, and hot swaps.

Every public model name maps to the base (adapters disabled) or to one loaded PEFT adapter, never merged. A request
takes a :class:`Lease` on the version its name points to when it is admitted, and keeps that version until it
finishes, whatever happens to the name meanwhile.

Hot swap (:meth:`ModelRegistry.set_version`), the promotion and rollback path of ``posttrain loop``:
1. the new adapter is loaded under a fresh internal PEFT name, on the model thread between batches;
2. the public name is switched to it under a lock, so the next request admitted gets the new version;
3. the old adapter is retired, and deleted from the model once its last lease is released (its requests in
   flight, and those already queued, finish on it).

With ``registry=`` (the loop's registry), the server starts by serving the registry's current version (a pending
promotion or rollback first, since it passed its gates; the registry is then told the switch is done) under
``registry_model``, instead of whatever ``adapters`` names for it.

:class:`VersionTable` (names, versions, leases, retirement) is shared with the vLLM engine's registry
(:mod:`posttrain.serve.vllm_models`); :class:`ModelRegistry` adds the built-in engine's PEFT model and worker.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from posttrain.errors import ConfigError, PosttrainError
from posttrain.serve.decode import Event, Finished, Job, RowSampling, decode_batch
from posttrain.serve.worker import GenerationWorker, QueueFull

if TYPE_CHECKING:
    from posttrain.commands.serve import ServeConfig

BASE_VERSION = "base"


def _registry_version(cfg: ServeConfig):
    """(the loop's registry, ``{adapter, version}`` it wants served at start-up); the second is None with no
    registry or an empty one."""
    if not cfg.registry:
        return None, None
    from posttrain.loop.registry import Registry

    if not Path(cfg.registry).is_dir():
        raise ConfigError(f"registry: {cfg.registry}: no such folder (the loop's registry=)")
    loop_registry = Registry(cfg.registry)
    version = loop_registry.wanted()
    if version is None:
        return loop_registry, None
    servable, why = loop_registry.servable(version)
    if not servable:
        raise ConfigError(f"registry: {why}")
    adapter = loop_registry.adapter_of(version)
    if adapter is None:
        raise ConfigError(f"registry: version '{version}' is the base model alone; serve it as the base model")
    return loop_registry, {"adapter": adapter, "version": version}


class UnknownModel(PosttrainError):
    """A request named a model this server does not serve."""


@dataclass(eq=False)  # compared by identity: the worker batches requests of the same loaded adapter
class LoadedAdapter:
    key: str  # the internal PEFT adapter name
    version: str
    path: str
    leases: int = 0
    retired: bool = False


@dataclass
class Lease:
    model: str
    version: str
    adapter: LoadedAdapter | None  # None: the base model
    released: bool = field(default=False, repr=False)


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_lora_dir(adapter_dir: str):
    """The PEFT config of the LoRA adapter in ``adapter_dir``; a ConfigError when it is not one."""
    from peft import PeftConfig

    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"adapter: '{adapter_dir}' is not a PEFT adapter directory (no adapter_config.json)")
    try:
        config = PeftConfig.from_pretrained(adapter_dir)
        kind = config.peft_type.value
    except Exception as e:  # not JSON, `{}`, unknown keys or peft_type: PEFT raises many kinds
        raise ConfigError(f"adapter: {config_path} is not a valid PEFT adapter config ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
    if kind != "LORA":
        raise ConfigError(f"adapter: '{adapter_dir}' is a {kind} adapter; serve loads LoRA/DoRA adapters only")
    return config


def load_versions(registry, cfg: ServeConfig) -> None:
    """Serve ``cfg.adapters`` and, with ``registry=``, the loop registry's version on ``registry`` (a
    :class:`ModelRegistry` or a :class:`~posttrain.serve.vllm_models.VLLMModelRegistry`), then confirm a pending
    registry switch."""
    adapters = dict(cfg.adapters)
    loop_registry, from_registry = _registry_version(cfg)
    if from_registry is not None:
        adapters[cfg.registry_model] = from_registry
    for name, spec in adapters.items():
        path, version = (spec, None) if isinstance(spec, str) else (spec["adapter"], spec.get("version"))
        registry.set_version(name, path, str(version) if version is not None else Path(path.rstrip("/")).name)
    if from_registry is not None:
        if loop_registry.pending and loop_registry.pending["version"] == from_registry["version"]:
            loop_registry.confirm(from_registry["version"], "posttrain serve loaded it at start-up")


class VersionTable:
    """Public names -> loaded adapter versions, and the leases on them: what both engines share. A subclass has a
    ``worker`` with ``start()``, ``stop()``, ``submit(job)`` (QueueFull when full) and ``wake()`` (run its
    between-steps cleanup soon)."""

    engine = "builtin"  # which generation engine runs (GET /health says)

    def __init__(self, base_name: str):
        self.base_name = base_name
        self.created = int(time.time())
        self._served: dict[str, LoadedAdapter] = {}
        self._retired: list[LoadedAdapter] = []
        self._lock = threading.Lock()
        self._keys = itertools.count()

    def served(self) -> dict[str, str]:
        """Public model name -> the version it serves now."""
        with self._lock:
            return {self.base_name: BASE_VERSION, **{name: a.version for name, a in self._served.items()}}

    def acquire(self, name: str) -> Lease:
        with self._lock:
            if name == self.base_name:
                return Lease(name, BASE_VERSION, None)
            adapter = self._served.get(name)
            if adapter is None:
                known = ", ".join([self.base_name, *self._served])
                raise UnknownModel(f"model '{name}' does not exist; this server serves: {known}")
            adapter.leases += 1
            return Lease(name, adapter.version, adapter)

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            if lease.adapter is not None:
                lease.adapter.leases -= 1
                assert lease.adapter.leases >= 0
        if lease.adapter is not None and lease.adapter.retired:
            self.worker.wake()

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, lease: Lease, prompt_ids: list[int], sampling: RowSampling, emit: Callable[[Event], None]) -> Job:
        """Queue a request on the version ``lease`` holds; the lease is released when the job ends, or now when the
        queue is full (:class:`~posttrain.serve.worker.QueueFull`)."""
        job = Job(prompt_ids, sampling, group=lease.adapter, emit=emit, lease=lease)
        try:
            self.worker.submit(job)
        except QueueFull:
            self.release(lease)
            raise
        return job

    def _check_name(self, name: str, version: str) -> None:
        if name == self.base_name:
            raise ConfigError(f"model '{name}' is the base model; serve an adapter under another name")
        if not name or not version:
            raise ConfigError("model and version: must be non-empty")

    def _publish(self, name: str, adapter: LoadedAdapter) -> str | None:
        """Point ``name`` at the loaded ``adapter``; retire the one it pointed at. -> its version, or None."""
        with self._lock:
            previous = self._served.get(name)
            self._served[name] = adapter
            if previous is not None:
                previous.retired = True
                self._retired.append(previous)
        self.worker.wake()
        return previous.version if previous is not None else None

    def _unleased_retired(self) -> list[LoadedAdapter]:
        """The retired adapters whose last lease has ended (removed from the retired list: the caller deletes them)."""
        with self._lock:
            done = [a for a in self._retired if a.leases == 0]
            self._retired = [a for a in self._retired if a.leases > 0]
        return done


class ModelRegistry(VersionTable):
    """Model names -> versions, the leases on them, and the generation worker that owns the model."""

    def __init__(self, model, tokenizer, *, base_name: str, batch_size: int = 8, max_queue: int = 64, seed: int = 0):
        from posttrain.models.loading import eos_token_ids

        super().__init__(base_name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.worker = GenerationWorker(self._run_batch, batch_size=batch_size, max_queue=max_queue,
                                       between_batches=self._delete_retired)

    @classmethod
    def load(cls, cfg: ServeConfig) -> ModelRegistry:
        """Load ``cfg.model`` (on the GPU when there is one) and ``cfg.adapters``; the worker is not started."""
        from posttrain.models.loading import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = load_causal_lm(cfg.model, dtype=_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code)
        if torch.cuda.is_available():
            model = model.to("cuda")
        base_name = cfg.model_name or Path(cfg.model.rstrip("/")).name
        registry = cls(model, tokenizer, base_name=base_name, batch_size=cfg.batch_size, max_queue=cfg.max_queue,
                       seed=cfg.seed)
        load_versions(registry, cfg)
        return registry

    # ------------------------------------------------------------------------------------------ hot swap
    def set_version(self, name: str, adapter_dir: str, version: str) -> str | None:
        """Serve the LoRA adapter in ``adapter_dir`` as ``name`` from the next request on (module docstring).

        Returns the version served before, or None for a new name. Blocks until the adapter is loaded (the model
        thread loads it between batches)."""
        self._check_name(name, version)
        check_lora_dir(adapter_dir)
        adapter = LoadedAdapter(key=f"adapter_{next(self._keys)}", version=version, path=str(adapter_dir))
        self.worker.call(lambda: self._load_adapter(adapter))
        return self._publish(name, adapter)

    def loaded_adapters(self) -> list[str]:
        """Internal names of the adapters in memory (retired ones included until their leases end)."""
        from peft import PeftModel

        return list(self.model.peft_config) if isinstance(self.model, PeftModel) else []

    # ------------------------------------------------------------------------------------------ model thread
    def _load_adapter(self, adapter: LoadedAdapter) -> None:
        from peft import PeftModel

        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(adapter.path, adapter_name=adapter.key)
            else:
                self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=adapter.key)
        except Exception as e:  # a broken adapter must not take the server down
            if isinstance(self.model, PeftModel) and adapter.key in self.model.peft_config:
                self.model.delete_adapter(adapter.key)
            raise ConfigError(f"adapter: could not load '{adapter.path}' onto the base model: {e}") from e
        self.model.eval()

    def _delete_retired(self) -> None:
        done = self._unleased_retired()
        if not done:
            return
        doomed = {a.key for a in done}
        if self.model.active_adapter in doomed:  # PEFT would switch to another adapter itself, with a warning
            self.model.set_adapter(next(k for k in self.model.peft_config if k not in doomed), inference_mode=True)
        for key in doomed:
            self.model.delete_adapter(key)

    def _run_batch(self, jobs: list[Job]) -> None:
        from peft import PeftModel

        try:
            live = [j for j in jobs if not j.cancelled.is_set()]
            for job in jobs:
                if job.cancelled.is_set():
                    job.emit(Finished("cancelled", 0))
            if not live:
                return
            adapter = live[0].group
            if adapter is None:
                use = self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext()
            else:
                self.model.set_adapter(adapter.key, inference_mode=True)
                use = contextlib.nullcontext()
            with use:
                decode_batch(self.model, self.tokenizer, live, self.eos_ids, self.generator)
        finally:
            for job in jobs:
                self.release(job.lease)
