"""``posttrain ui``: the web dashboard (runs, reports, the live loop) on loopback."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from dataclasses import dataclass

from posttrain.config import opt
from posttrain.errors import ConfigError, PosttrainError

HELP = ("A web dashboard: training runs live (progress, ETA, charts, overlays), pipeline/compare/RL/audit reports, "
        "and the loop's registry, feedback and promote/rollback buttons (see `posttrain ui --help`).")

EPILOG = """Reading needs a key (Authorization: Bearer, typed into the page) whenever $POSTTRAIN_API_KEY or
$POSTTRAIN_ADMIN_KEY is set; with neither, reading is open and the dashboard only binds to loopback. Promote and
rollback need --actions and the admin key ($POSTTRAIN_ADMIN_KEY, the server's admin key): they run exactly what
`posttrain rollback` runs (gated versions only, audited with via=ui, the server switched without a restart).

examples:
  posttrain ui                                   # runs under ./runs on http://127.0.0.1:7860
  posttrain ui --root runs/recipes/brand_voice   # one pipeline's stages and report
  posttrain ui --loop loop.yaml                  # also the loop: registry, served version, feedback (its db)
  posttrain ui --root runs/demo-loop --registry runs/demo-loop/registry --db sqlite:///runs/demo-loop/feedback.db
  POSTTRAIN_ADMIN_KEY=... posttrain ui --loop loop.yaml --actions   # with `posttrain serve`'s admin key
"""


@dataclass
class UIConfig:
    root: str = opt("runs", "Folder whose runs are shown (walked recursively: stage runs, pipelines, comparisons, audits).")
    loop: str | None = opt(None, "The loop's config (`posttrain loop`'s YAML): registry, db, server_url and served_model are read from it.")
    registry: str | None = opt(None, "The loop's registry folder (overrides the loop config's).")
    db: str | None = opt(None, "The feedback store's URL, sqlite:///path or postgresql://... (overrides the loop config's).")
    server_url: str | None = opt(None, "The running `posttrain serve`, to show what it serves and switch it on promote/rollback.")
    served_model: str | None = opt(None, "The served name of the loop's versions (default: the loop config's, else assistant).")
    host: str = opt("127.0.0.1", "Address to listen on. Anything but loopback needs an API key ($api_key_env).")
    port: int = opt(7860, "TCP port.")
    actions: bool = opt(False, "Enable promote/rollback from the page (admin key only). Off: read-only.")
    api_key_env: str = opt("POSTTRAIN_API_KEY", "Environment variable with the keys that may read (comma-separated; the server's).")
    admin_key_env: str = opt("POSTTRAIN_ADMIN_KEY", "Environment variable with the admin keys (the only ones that act; the server's).")
    poll_s: float = opt(2.0, "How often the page refreshes live data, in seconds.")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(cfg: UIConfig):
    """(the dashboard's Access, the LoopConfig actions use or None), checked before anything starts."""
    from pathlib import Path

    from posttrain.config import build_config
    from posttrain.loop.run import LoopConfig
    from posttrain.serve import env_keys
    from posttrain.ui.app import Access

    loop_cfg = None
    if cfg.loop:
        if not Path(cfg.loop).is_file():
            raise ConfigError(f"loop: {cfg.loop}: no such file")
        loop_cfg = build_config(LoopConfig, cfg.loop, [], "loop options")
    elif cfg.registry:
        loop_cfg = LoopConfig()
    if loop_cfg is not None:
        for key in ("registry", "server_url", "served_model"):
            if getattr(cfg, key) is not None:
                setattr(loop_cfg, key, getattr(cfg, key))
        loop_cfg.admin_key_env = cfg.admin_key_env  # the dashboard's admin key is the one the server accepts
        cfg.db = cfg.db or loop_cfg.db
    if not Path(cfg.root).is_dir():
        raise ConfigError(f"root: {cfg.root}: no such folder (where are the runs? --root DIR)")
    if cfg.poll_s < 0.2:
        raise ConfigError(f"poll_s: expected at least 0.2 s, got {cfg.poll_s}")
    admin = env_keys(cfg.admin_key_env)
    viewers = env_keys(cfg.api_key_env)
    if set(admin) & set(viewers):
        raise ConfigError(f"admin keys: an admin key is also an API key; give ${cfg.admin_key_env} keys of their own")
    if not viewers and not admin and not _loopback(cfg.host):
        raise ConfigError(f"host: {cfg.host} is not loopback; set ${cfg.api_key_env} so that reading needs a key "
                          "(the dashboard shows training data and users' feedback)")
    if cfg.actions:
        if not admin:
            raise ConfigError(f"actions: need an admin key in ${cfg.admin_key_env} (the server's admin key)")
        if loop_cfg is None:
            raise ConfigError("actions: need the loop's registry (--loop LOOP.yaml or --registry DIR)")
    view_keys = viewers + admin if (viewers or admin) else None
    return Access(view_keys=view_keys, admin_keys=admin, actions=cfg.actions), loop_cfg


def serve(cfg: UIConfig) -> None:
    import uvicorn

    from posttrain.ui.app import create_app

    access, loop_cfg = resolve(cfg)
    app = create_app(cfg, access, loop_cfg)
    reading = "needs a key" if access.view_keys else "open (loopback, no key set)"
    acting = "promote/rollback on (admin key)" if access.actions else "read-only"
    print(f"posttrain ui: http://{cfg.host}:{cfg.port}/  runs under {cfg.root}; reading {reading}; {acting}"
          + (f"; registry {loop_cfg.registry}" if loop_cfg else "") + (f"; feedback {cfg.db}" if cfg.db else ""),
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", limit_concurrency=64,
                h11_max_incomplete_event_size=64 * 1024)


def main(argv: list[str]) -> int:
    from posttrain.config import build_config, help_table

    p = argparse.ArgumentParser(prog="posttrain ui", description=HELP.split(" (see")[0] + ".",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="keys (key=value):\n" + "\n".join(f"  {k} = {d}: {h}" for k, d, h in
                                                                          help_table(UIConfig)) + "\n\n" + EPILOG)
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value")
    for flag in ("root", "loop", "registry", "db", "server-url", "served-model", "host", "port"):
        p.add_argument(f"--{flag}", metavar=flag.upper().replace("-", "_"), help=f"same as {flag.replace('-', '_')}=")
    p.add_argument("--actions", action="store_true", help="same as actions=true")
    a = p.parse_args(argv)
    path = a.args[0] if a.args and "=" not in a.args[0] else None
    overrides = a.args[1:] if path else list(a.args)
    for flag in ("root", "loop", "registry", "db", "server_url", "served_model", "host", "port"):
        if getattr(a, flag) is not None:
            overrides.append(f"{flag}={getattr(a, flag)}")
    if a.actions:
        overrides.append("actions=true")
    try:
        serve(build_config(UIConfig, path, overrides, "ui options"))
    except PosttrainError as e:
        print(f"posttrain ui: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
