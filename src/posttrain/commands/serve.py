"""``posttrain serve``: the model and its LoRA adapters behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config import opt, section
from posttrain.errors import ConfigError

HELP = "Serve the model and its LoRA adapters over an OpenAI-compatible HTTP API, logging completions and feedback."
EXAMPLES = ("POSTTRAIN_API_KEY=secret posttrain serve 'adapters={assistant: runs/dpo}'\n"
            "  POSTTRAIN_API_KEY=secret POSTTRAIN_ADMIN_KEY=other posttrain serve registry=runs/loop   # the loop's gated versions\n"
            "  posttrain serve --no-auth port=8080\n"
            "  POSTTRAIN_API_KEY=secret posttrain serve engine=vllm 'adapters={assistant: runs/dpo}'   # vLLM's engine (make vllm)")
# Flags beside the keys: flag -> (the override it stands for, its help).
FLAGS = {"--no-auth": ("auth=false", "Turn API-key auth off (auth=false), for local use only.")}


@dataclass
class ServeSamplingSection:
    max_tokens: int = opt(256, "Tokens generated when a request gives no max_tokens (at most max_tokens_limit).")
    temperature: float = opt(1.0, "Temperature when a request gives none (OpenAI's default is 1); 0 = greedy.")
    top_p: float = opt(1.0, "Nucleus sampling threshold when a request gives none.")


@dataclass
class ServeVLLMSection:
    memory: float = opt(0.3, "Share of the device's memory vLLM reserves for the weights and the KV cache (its gpu_memory_utilization; on a CPU, the share of RAM). Serving alone on a GPU, 0.9 fits the most concurrent requests.")
    kv_cache_gb: float | None = opt(None, "KV-cache size in GiB, fixed. Unset: 1 GiB on a CPU (vLLM would otherwise size it as memory x RAM minus this process's resident memory), and on a GPU what `memory` leaves.")
    max_model_len: int = opt(0, "Longest prompt + completion vLLM plans its KV cache for; 0 = the model's context, capped at max_prompt_tokens + max_tokens_limit.")
    enforce_eager: bool = opt(True, "Run the model eagerly: no torch.compile / CUDA-graph capture at start-up. On a GPU, false is faster per token once compiled (start-up takes longer).")
    max_lora_rank: int = opt(0, "Largest LoRA rank vLLM accepts, rounded up to one it supports (1, 8, 16, 32, 64, ...); 0 = the largest rank among the adapters served at start-up, at least 16. An adapter of a higher rank cannot be hot-swapped in later.")
    max_loras: int = opt(4, "Distinct adapters in one decoding batch (vLLM's max_loras); requests for more wait their turn. All served adapters stay loaded in CPU memory.")


@dataclass
class ServeConfig:
    """`posttrain serve`: an OpenAI-compatible API for a base model and its LoRA adapters."""

    model: str = opt("smollm2-135m", "Base model: 'smollm2-135m' (embedded), a local HF directory, or a hub id.")
    model_name: str | None = opt(None, "Name clients use for the base model (default: the last part of `model`, e.g. smollm2-135m).")
    adapters: dict = opt({}, "LoRA adapters served next to the base, one base model in memory: {name: adapter_dir} or {name: {adapter: dir, version: v}}; clients select one by `model: name`. The version defaults to the directory's name.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Weights' dtype (both engines): auto = bfloat16 on GPUs that support it, else float32.")
    engine: Literal["builtin", "vllm"] = opt("builtin", "What generates: builtin = posttrain's batched KV-cache loop on one worker thread (no extra dependency); vllm = vLLM's engine in this process (continuous batching, multi-LoRA; needs `make vllm`; LoRA adapters only, no DoRA). The API, keys, limits, completion log, feedback and hot swap are the same; see the vllm section.")
    vllm: ServeVLLMSection = section(ServeVLLMSection, "engine=vllm only: vLLM's engine settings (batch_size is its max_num_seqs, seed its seed).")
    host: str = opt("127.0.0.1", "Address to listen on; 0.0.0.0 exposes the server to the network.")
    port: int = opt(8000, "TCP port (0: any free port).")
    auth: bool = opt(True, "Require `Authorization: Bearer <key>`. false (or --no-auth) turns auth off, for local use only.")
    api_key_env: str = opt("POSTTRAIN_API_KEY", "Environment variable holding the accepted API key(s), comma-separated.")
    api_keys: list[str] = opt([], "More accepted API keys (a config file is easy to leak: prefer api_key_env).")
    admin_key_env: str = opt("POSTTRAIN_ADMIN_KEY", "Environment variable holding the admin key(s), comma-separated: the only keys that reach /v1/admin/* (unset: admin routes are off). Must differ from every API key.")
    admin_keys: list[str] = opt([], "More admin keys (prefer admin_key_env).")
    registry: str | None = opt(None, "The loop's registry folder (`posttrain loop`'s registry=): the admin route serves only its versions that passed their gates, and at start-up the server serves its current version as `registry_model`.")
    registry_model: str = opt("assistant", "The served name the loop's registry versions are served under.")
    max_served_names: int = opt(16, "Most model names (adapters) served at once; the admin route cannot add more.")
    db: str = opt("sqlite:///runs/serve/feedback.db", "Where completions and feedback are stored: sqlite:///path or a postgresql:// URL.")
    max_body_bytes: int = opt(1_000_000, "Largest request body accepted; larger ones get 413.")
    max_tokens_limit: int = opt(1024, "Largest max_tokens a request may ask for; more gets 400.")
    max_prompt_tokens: int = opt(4096, "Largest prompt (chat template applied) in tokens; longer gets 400.")
    max_messages: int = opt(256, "Most messages in one request.")
    max_stop_strings: int = opt(4, "Most stop strings in one request (OpenAI allows 4).")
    max_stop_chars: int = opt(256, "Longest stop string in characters.")
    max_comment_chars: int = opt(4000, "Longest feedback comment in characters.")
    feedback_any_key: bool = opt(False, "Accept feedback on a completion made with another API key (off: only the key that made a completion can rate it).")
    allow_control_tokens: bool = opt(False, "Read chat-template control tokens (e.g. <|im_start|>) in message content as control tokens. Off: content is tokenised as plain text, so a user cannot forge a system turn.")
    max_connections: int = opt(256, "Open connections at most; more get 503.")
    timeout_keep_alive_s: int = opt(5, "Seconds an idle keep-alive connection stays open.")
    timeout_header_s: float = opt(10.0, "Seconds a client has to send a request's headers; slower connections are closed.")
    max_queue: int = opt(64, "Requests waiting for the generation worker at most; more get 503 (retry later).")
    batch_size: int = opt(8, "Requests decoded together at most: builtin, requests for the same model version; vllm, requests of any versions (its max_num_seqs).")
    seed: int = opt(0, "Seed of the server's sampling generator.")
    sampling: ServeSamplingSection = section(ServeSamplingSection, "Defaults for sampling fields a request leaves out.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = opt("info", "uvicorn's log level.")

    def validate(self) -> None:
        positive = {"max_body_bytes": self.max_body_bytes, "max_tokens_limit": self.max_tokens_limit,
                    "max_prompt_tokens": self.max_prompt_tokens, "max_messages": self.max_messages,
                    "max_queue": self.max_queue, "batch_size": self.batch_size, "sampling.max_tokens": self.sampling.max_tokens,
                    "max_served_names": self.max_served_names, "max_stop_strings": self.max_stop_strings,
                    "max_stop_chars": self.max_stop_chars, "max_comment_chars": self.max_comment_chars,
                    "max_connections": self.max_connections, "timeout_keep_alive_s": self.timeout_keep_alive_s}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be in 0..65535, got {self.port}")
        if not self.timeout_header_s > 0:
            raise ConfigError(f"timeout_header_s: must be > 0, got {self.timeout_header_s}")
        if len(self.adapters) > self.max_served_names:
            raise ConfigError(f"adapters: {len(self.adapters)} adapters, over max_served_names={self.max_served_names}")
        if self.sampling.temperature < 0 or not 0 < self.sampling.top_p <= 1:
            raise ConfigError("sampling: temperature must be >= 0 and top_p in (0, 1]")
        if not 0 < self.vllm.memory < 1:
            raise ConfigError(f"vllm.memory: a share of memory in (0, 1), got {self.vllm.memory}")
        if self.vllm.kv_cache_gb is not None and not self.vllm.kv_cache_gb > 0:
            raise ConfigError(f"vllm.kv_cache_gb: a size in GiB > 0, or unset, got {self.vllm.kv_cache_gb}")
        if self.vllm.max_model_len < 0 or self.vllm.max_lora_rank < 0 or self.vllm.max_loras < 1:
            raise ConfigError("vllm.max_model_len and vllm.max_lora_rank: must be >= 0; vllm.max_loras: >= 1")
        for name, spec in self.adapters.items():
            ok = isinstance(spec, str) or (isinstance(spec, dict) and isinstance(spec.get("adapter"), str)
                                            and set(spec) <= {"adapter", "version"})
            if not ok:
                raise ConfigError(f"adapters.{name}: expected an adapter directory or {{adapter: dir, version: v}}, got {spec!r}")


Config = ServeConfig


def run(cfg: ServeConfig) -> None:
    from posttrain.serve import run_serve

    run_serve(cfg)
