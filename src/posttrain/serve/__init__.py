"""``posttrain serve``: an OpenAI-compatible HTTP API for a base model and its LoRA adapters.

- :mod:`.app`: the FastAPI app (endpoints, auth, limits, completion logging, feedback);
- :mod:`.models`: the model registry (one base model, PEFT adapters by name, leases, hot swap);
- :mod:`.worker`: the generation worker thread (bounded queue, batches per adapter);
- :mod:`.decode`: the batched KV-cache decoding loop that streams text deltas;
- :mod:`.vllm_models`: the same registry over vLLM's engine (``engine=vllm``: continuous batching, multi-LoRA);
- :mod:`.schemas`: request bodies and OpenAI-style errors;
- :mod:`.protocol`: the HTTP connection guard (header-read timeout).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from posttrain.errors import ConfigError

if TYPE_CHECKING:
    from posttrain.commands.serve import ServeConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def env_keys(variable: str) -> list[str]:
    """The comma-separated keys in environment variable ``variable`` (blanks dropped): the format of the server's
    API and admin key variables, which the loop and the dashboard read too."""
    return [k.strip() for k in os.environ.get(variable, "").split(",") if k.strip()]


def resolve_api_keys(cfg: ServeConfig) -> list[str] | None:
    """The accepted keys: ``cfg.api_keys`` plus the comma-separated keys in ``$cfg.api_key_env``. None when auth is
    off (only ever by ``auth: false``); a ConfigError when auth is on and there is no key."""
    if not cfg.auth:
        return None
    keys = [k for k in cfg.api_keys if k]
    keys += env_keys(cfg.api_key_env)
    if not keys:
        raise ConfigError(f"auth: no API key; set {cfg.api_key_env}=<key> in the environment (or api_keys), or run "
                          "with --no-auth (auth=false) for local use only")
    return keys


def resolve_admin_keys(cfg: ServeConfig, api_keys: list[str] | None) -> list[str]:
    """The admin keys: ``cfg.admin_keys`` plus ``$cfg.admin_key_env``; empty means the admin routes are off. An
    admin key that is also an API key is a ConfigError: a user holding it could change what is served."""
    keys = [k for k in cfg.admin_keys if k]
    keys += env_keys(cfg.admin_key_env)
    if set(keys) & set(api_keys or []):
        raise ConfigError(f"admin keys: an admin key is also an API key; give ${cfg.admin_key_env} keys of their own")
    return keys


def uvicorn_config(app, cfg: ServeConfig, **overrides):
    """uvicorn's settings for ``app``: the connection limit, keep-alive and header-read timeouts, and a 64 KiB cap
    on a request's headers."""
    import uvicorn

    from posttrain.serve.protocol import guarded_h11

    return uvicorn.Config(app, **{
        "host": cfg.host, "port": cfg.port, "log_level": cfg.log_level, "http": guarded_h11(cfg.timeout_header_s),
        "limit_concurrency": cfg.max_connections, "timeout_keep_alive": cfg.timeout_keep_alive_s,
        "h11_max_incomplete_event_size": 64 * 1024, **overrides})


def load_registry(cfg: ServeConfig):
    """The model registry of ``cfg.engine``, models and adapters loaded, not started: a
    :class:`~posttrain.serve.models.ModelRegistry` (builtin) or a
    :class:`~posttrain.serve.vllm_models.VLLMModelRegistry` (vllm; vLLM is imported only then)."""
    if cfg.engine == "vllm":
        from posttrain.serve.vllm_models import VLLMModelRegistry

        return VLLMModelRegistry.load(cfg)
    from posttrain.serve.models import ModelRegistry

    return ModelRegistry.load(cfg)


def run_serve(cfg: ServeConfig) -> None:
    """Load the models, open the feedback store and serve until interrupted."""
    import uvicorn

    from posttrain.feedback.store import FeedbackStore
    from posttrain.serve.app import create_app

    api_keys = resolve_api_keys(cfg)
    admin_keys = resolve_admin_keys(cfg, api_keys)
    if api_keys is None:
        where = "" if cfg.host in LOOPBACK else f" AND LISTENING ON {cfg.host}, reachable from the network"
        print(f"posttrain serve: WARNING: auth is off (auth=false): anyone who can connect can generate and give "
              f"feedback on any completion{where}", file=sys.stderr)
    store = FeedbackStore(cfg.db)
    try:
        registry = load_registry(cfg)
    except BaseException:
        store.close()
        raise
    registry.start()
    app = create_app(registry, store, cfg, api_keys, admin_keys)
    served = ", ".join(f"{name} ({version})" for name, version in registry.served().items())
    admin = (f"admin routes on (${cfg.admin_key_env}), serving versions of {cfg.registry}" if admin_keys and cfg.registry
             else "admin routes on, but no registry= to serve versions from" if admin_keys
             else f"admin routes off (no ${cfg.admin_key_env})")
    print(f"posttrain serve: engine {registry.engine}; models {served}; completions and feedback go to {cfg.db}; {admin}", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn_config(app, cfg)).run()
    finally:
        registry.stop()
        store.close()
