"""``posttrain loop`` and ``posttrain rollback``: adapt a served model from its users' feedback, safely.

One cycle:

1. **trigger**: at least ``min_feedback`` new feedback items in the store since the last cycle, or, with
   ``every_s``, that many seconds since the last cycle and any new feedback (checked every ``poll_s`` seconds;
   ``--once`` runs one check and exits);
2. **curate**: export the new feedback as KTO (thumbs, ratings, corrections) or DPO (preferences, corrections)
   rows through the data filters (:mod:`posttrain.feedback.export`), hashed into the registry;
3. **train** a candidate adapter starting from the serving version (``posttrain kto|dpo`` with
   ``adapter=<serving>``, plus the ``train:`` overrides; KTO's class weights are set from the label counts so
   desirable and undesirable weigh the same, as the KTO paper recommends, unless ``train`` sets them);
4. **gates** (:mod:`posttrain.loop.gates`): the candidate must beat the serving version on held-out reward or
   preference accuracy, must not forget (general perplexity, fixed-task accuracy) and must pass the
   reward-hacking guards (answer length change, duplicate answers);
5. **decide**: promote or reject with the reasons. A promotion is two-phase (:mod:`posttrain.loop.registry`):
   the registry records it as pending, the running server switches to it through ``POST /v1/admin/versions``
   (with the admin key; no restart, requests in flight finish on the old version), and only its answer makes the
   version ``serving``. Every decision and switch is in the registry's ``audit.jsonl``.

Each cycle (and ``posttrain rollback``) starts by reconciling the registry with the server (:func:`reconcile`):
a switch left pending by a crash or an unreachable server is finished, and a server restarted on another
version is switched back to the registry's.

``posttrain rollback VERSION`` makes an earlier version that passed its gates serve again (rejected candidates
never can; a never-gated candidate only with ``--override --reason``, audited).
The first run registers ``v0``: ``initial_adapter``, or a freshly initialised LoRA (its B matrices are zero, so
it answers exactly like the base model).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.config import build, build_config, opt, section
from posttrain.errors import ConfigError, PosttrainError
from posttrain.loop.gates import GatesSection, check
from posttrain.loop.registry import Registry, sha256_file


@dataclass
class LoopConfig:
    model: str = opt("smollm2-135m", "Base model the adapters belong to (as served).")
    served_model: str = opt("assistant", "The model name clients use for the adapted model (the server's adapter name).")
    initial_adapter: str | None = opt(None, "Adapter registered as v0 on the first run (null: a fresh LoRA, which answers like the base model).")
    registry: str = opt("runs/loop", "Registry folder: registry.json, versions/, audit.jsonl, cycles/.")
    db: str = opt("sqlite:///runs/serve/feedback.db", "The feedback store the server writes (sqlite:///path or a postgresql URL).")
    server_url: str | None = opt(None, "The running `posttrain serve` (e.g. http://127.0.0.1:8000) to switch on promotion/rollback (null: registry only).")
    admin_key_env: str = opt("POSTTRAIN_ADMIN_KEY", "Environment variable with the server's admin key (the server's admin_key_env; API keys cannot switch versions).")
    method: Literal["kto", "dpo"] = opt("kto", "Candidate training: kto (thumbs, ratings, corrections) or dpo (preferences, corrections).")
    min_feedback: int = opt(50, "New feedback items that start a cycle.")
    every_s: float = opt(0.0, "Schedule: also start a cycle when this many seconds have passed since the last one and there is any new feedback (0: count trigger only).")
    poll_s: float = opt(30.0, "Seconds between trigger checks when running continuously.")
    invert_feedback: bool = opt(False, "Train on inverted feedback (flipped labels / swapped pairs): a deliberately bad candidate, to check the gates.")
    train: dict = opt({}, "Overrides for the training stage (e.g. {max_steps: 20, lr: 5e-5, beta: 0.1}).")
    gates: GatesSection = section(GatesSection, "Promotion gates.")
    seed: int = opt(0, "Seed of training and evaluation.")

    def validate(self) -> None:
        g = self.gates
        if not ((g.prompts and g.rewards) or g.preference_data):
            raise ConfigError("gates: need an improvement gate: gates.prompts with gates.rewards, or gates.preference_data")
        for key in ("prompts", "preference_data", "general_data", "task_prompts"):
            path = getattr(g, key)
            if path and not Path(path).exists():
                raise ConfigError(f"gates.{key}: {path}: no such file")
        if self.min_feedback < 1:
            raise ConfigError(f"min_feedback: must be >= 1, got {self.min_feedback}")


def load_loop_config(path: str | None, overrides: list[str]) -> LoopConfig:
    cfg = build_config(LoopConfig, path, overrides, "loop options")
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------- evaluation
def _words(text: str) -> int:
    return len(text.split())


def evaluate_version(model, tokenizer, g: GatesSection, cache: dict | None = None) -> dict:
    """Every gate metric whose data is configured, for one model (a base with the version's adapter applied)."""
    import torch

    from posttrain.generation import SamplingConfig, generate
    from posttrain.rewards.registry import RewardSet

    metrics: dict = {}
    greedy = SamplingConfig(max_new_tokens=g.max_new_tokens, temperature=0.0)
    cache = {} if cache is None else cache

    def prompts_of(path):
        if path not in cache:
            from posttrain.data.prompts import prompt_rows

            cache[path] = prompt_rows(path)
        return cache[path]

    def scored(path, rewards):
        rows = prompts_of(path)
        convs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p, _ in rows]
        answers = generate(model, tokenizer, convs, greedy, batch_size=8)
        rs = RewardSet.from_config(rewards, "gates.rewards")
        try:
            totals, _ = rs.score([p for p, _ in rows], answers, [extra for _, extra in rows])
        finally:
            rs.close()
        return answers, [t if math.isfinite(t) else 0.0 for t in totals]

    if g.prompts and g.rewards:
        answers, totals = scored(g.prompts, g.rewards)
        metrics["reward"] = sum(totals) / len(totals)
        metrics["mean_words"] = sum(_words(a) for a in answers) / len(answers)
        norm = [" ".join(a.lower().split()) for a in answers]
        metrics["duplicate_share"] = sum(norm.count(a) > 1 for a in norm) / len(norm)
        metrics["answers"] = answers[:5]
    if g.task_prompts:
        _, totals = scored(g.task_prompts, g.task_rewards)
        metrics["task_accuracy"] = sum(totals) / len(totals)
    with torch.inference_mode():
        if g.preference_data:
            from posttrain.data.preference import collate_pairs, load_pair_dataset
            from posttrain.models.forward import sequence_logps

            if ("pairs", g.preference_data) not in cache:
                cache[("pairs", g.preference_data)] = load_pair_dataset(g.preference_data, tokenizer, max_length=1024)[0]
            pairs = cache[("pairs", g.preference_data)]
            right = 0
            for start in range(0, len(pairs), 8):
                chunk = pairs[start : start + 8]
                logps, _ = sequence_logps(model, collate_pairs(chunk, tokenizer.pad_token_id))
                right += int((logps[: len(chunk)] > logps[len(chunk) :]).sum())
            metrics["preference_accuracy"] = right / len(pairs)
        if g.general_data:
            from posttrain.data.batching import collate_sft
            from posttrain.data.dataset import load_sft_dataset
            from posttrain.models.forward import target_logps

            if ("sft", g.general_data) not in cache:
                cache[("sft", g.general_data)] = load_sft_dataset(g.general_data, tokenizer, max_length=1024)[0]
            rows = cache[("sft", g.general_data)]
            total, tokens = 0.0, 0
            for start in range(0, len(rows), 8):
                logps, _ = target_logps(model, collate_sft(rows[start : start + 8], tokenizer.pad_token_id))
                total -= float(logps.sum())
                tokens += logps.numel()
            metrics["perplexity"] = math.exp(min(total / max(tokens, 1), 50.0))
    return metrics


# --------------------------------------------------------------------------------------------- the cycle
def _fresh_lora(model_spec: str, out: Path) -> Path:
    """A LoRA adapter whose B matrices are zero: it answers exactly like the base model."""
    from posttrain.commands.sft import SFTConfig
    from posttrain.models.adapters import build_model

    cfg = build(SFTConfig, {"model": model_spec, "method": "lora"})  # no data needed: nothing is trained
    model, _ = build_model(cfg)
    model.save_pretrained(out)
    return out


def _admin_headers(cfg: LoopConfig) -> dict:
    from posttrain.serve import env_keys

    keys = env_keys(cfg.admin_key_env)
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def served_version(cfg: LoopConfig) -> str | None:
    """What the server says ``served_model`` serves now (``GET /v1/models``), or None when it does not serve it."""
    import httpx

    try:
        r = httpx.get(cfg.server_url.rstrip("/") + "/v1/models", headers=_admin_headers(cfg), timeout=30)
    except httpx.HTTPError as e:
        raise PosttrainError(f"could not reach the server at {cfg.server_url}: {e}") from None
    if r.status_code != 200:
        raise PosttrainError(f"the server at {cfg.server_url} answered GET /v1/models with HTTP {r.status_code} "
                             f"{r.text[:300]}")
    return {m["id"]: m.get("version") for m in r.json().get("data", [])}.get(cfg.served_model)


def switch(cfg: LoopConfig, registry: Registry, version: str) -> str:
    """The second phase of a promotion or rollback: make the server serve ``version``, then confirm it in the
    registry. On failure the registry keeps the switch pending (the next :func:`reconcile` retries)."""
    if not cfg.server_url:
        registry.confirm(version, "registry only (no server_url)")
        return "no server_url: registry updated only"
    import httpx

    body = {"model": cfg.served_model, "version": version}
    try:
        r = httpx.post(cfg.server_url.rstrip("/") + "/v1/admin/versions", json=body, headers=_admin_headers(cfg),
                       timeout=300)
    except httpx.HTTPError as e:
        registry.log("switch_failed", version=version, error=str(e)[:300])
        raise PosttrainError(f"could not reach the server at {cfg.server_url} to switch to {version}: {e}; the "
                             "registry keeps the switch pending and the next loop cycle or rollback retries it") from None
    if r.status_code != 200:
        registry.log("switch_failed", version=version, error=f"HTTP {r.status_code} {r.text[:300]}")
        raise PosttrainError(f"the server refused to switch to {version}: HTTP {r.status_code} {r.text[:300]}")
    registry.confirm(version, f"server {cfg.server_url}")
    return f"server {cfg.server_url} now serves {cfg.served_model} = {version}"


def serve_version(cfg: LoopConfig, registry: Registry, version: str, reason: str = "", *, override: bool = False,
                  via: str = "cli") -> str:
    """An operator's promotion or rollback (``posttrain rollback`` and the dashboard's buttons, audited the same
    way): record it as pending in the registry (gated versions only, see :meth:`Registry.rollback`), then switch
    the server and confirm. Returns what was done."""
    event = registry.rollback(version, reason, override=override, via=via)
    return f"{event}: {cfg.served_model} = {version} ({switch(cfg, registry, version)})"


def reconcile(cfg: LoopConfig, registry: Registry, log=print) -> str:
    """Make the registry and the server agree on what serves (module docstring); returns what was done."""
    registry.reload()
    wanted = registry.wanted()
    if wanted is None:
        return "empty registry"
    if not cfg.server_url:
        if registry.pending:
            registry.confirm(wanted, "registry only (no server_url)")
            return f"confirmed pending {wanted} (no server_url)"
        return "in agreement (no server_url)"
    served = served_version(cfg)
    if served == wanted:
        if registry.pending:
            registry.confirm(wanted, f"reconciled: server {cfg.server_url} already serves it")
            return f"the server already served pending {wanted}: confirmed"
        return f"in agreement: {cfg.served_model} = {wanted}"
    log(f"[loop] reconcile: the server serves {cfg.served_model} = {served}, the registry wants {wanted}: switching")
    return switch(cfg, registry, wanted)


def ensure_initial(cfg: LoopConfig, registry: Registry) -> None:
    if registry.versions:
        return
    adapter = cfg.initial_adapter
    if adapter is None:
        adapter = str(_fresh_lora(cfg.model, registry.root / "initial-lora"))
    vid = registry.register(adapter, parent=None, note="initial version")
    # the model that served before the loop existed: it passes by definition, and reconcile serves it
    registry.decide(vid, True, ["initial version"], {})


def _invert(path: Path, method: str) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        if method == "kto":
            r["label"] = not r["label"]
        else:
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def kto_balance(path: Path) -> tuple[float, float] | None:
    """KTO loss weights for the label counts in ``path``: the KTO paper (Ethayarajh et al. 2024, section 4) wants
    lambda_D n_D / (lambda_U n_U) in [1, 4/3]; live thumbs are rarely balanced. Returns (lambda_D, lambda_U) giving
    a ratio of 1, with the larger class at weight 1, or None when one label is missing."""
    labels = [json.loads(line)["label"] for line in path.read_text().splitlines() if line.strip()]
    n_d, n_u = sum(labels), len(labels) - sum(labels)
    if not n_d or not n_u:
        return None
    return (n_u / n_d, 1.0) if n_u >= n_d else (1.0, n_d / n_u)


def run_cycle(cfg: LoopConfig, registry: Registry, store, *, log=print, now=time.time) -> dict:
    """One trigger check and, if it fires, one curate/train/gate/decide cycle; returns what happened."""
    import importlib

    from posttrain.commands import load_config
    from posttrain.feedback.export import export_feedback
    from posttrain.models.adapters import load_for_inference
    from posttrain.models.loading import load_tokenizer

    ensure_initial(cfg, registry)
    try:
        done = reconcile(cfg, registry, log)
        if not done.startswith("in agreement"):
            log(f"[loop] reconcile: {done}")
    except PosttrainError as e:  # the server is down: the switch stays pending, gating can still go on
        log(f"[loop] reconcile: {e}; a pending switch stays pending")
    registry.reload()
    since = int(registry.state.get("last_feedback_id", 0))
    new = store.count_feedback(since)
    parent = registry.wanted()  # a pending promotion passed its gates: the next candidate builds on it
    last = float(registry.state.get("last_cycle_time", registry.versions[parent]["created"]))
    scheduled = cfg.every_s > 0 and new > 0 and now() - last >= cfg.every_s
    if new < cfg.min_feedback and not scheduled:
        return {"event": "waiting", "new_feedback": new, "needed": cfg.min_feedback}
    registry.update_state(last_cycle_time=now())
    cycle = registry.root / "cycles" / f"v{len(registry.versions)}"
    cycle.mkdir(parents=True, exist_ok=True)
    data = cycle / f"{cfg.method}.jsonl"
    exported = export_feedback(store, cfg.method, data, since_id=since)
    log(f"[loop] {new} new feedback items since #{since}: " + exported.summary().splitlines()[0])
    if exported.kept == 0:
        registry.update_state(last_feedback_id=exported.last_id)
        registry.log("skip", reason="no training rows in the new feedback", since=since, last=exported.last_id)
        return {"event": "skip", "reason": "no training rows"}
    if cfg.invert_feedback:
        _invert(data, cfg.method)
    hashes = {data.name: sha256_file(data)}

    stage_overrides = [f"model={cfg.model}", f"data.train={data}", f"output_dir={cycle / 'candidate'}",
                       f"adapter={registry.adapter_of(parent)}", "tensorboard=false", f"seed={cfg.seed}"]
    stage_overrides += [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in cfg.train.items()]
    weights = kto_balance(data) if cfg.method == "kto" and not {"desirable_weight", "undesirable_weight"} & set(cfg.train) else None
    if weights:
        stage_overrides += [f"desirable_weight={weights[0]:.3f}", f"undesirable_weight={weights[1]:.3f}"]
    log(f"[loop] training a candidate from {parent}: posttrain {cfg.method} " + " ".join(stage_overrides))
    result = importlib.import_module(f"posttrain.stages.{cfg.method}").train(load_config(cfg.method, None, stage_overrides))
    vid = registry.register(result.output_dir, parent=parent, data=hashes,
                            note="inverted feedback (gate check)" if cfg.invert_feedback else "")

    tokenizer = load_tokenizer(cfg.model)
    cache: dict = {}
    metrics = {}
    for name, version in (("serving", parent), ("candidate", vid)):
        model = load_for_inference(cfg.model, registry.adapter_of(version))
        metrics[name] = evaluate_version(model, tokenizer, cfg.gates, cache)
        del model
    promote, reasons = check(metrics["serving"], metrics["candidate"], cfg.gates)
    registry.decide(vid, promote, reasons, metrics)
    registry.update_state(last_feedback_id=exported.last_id)
    for r in reasons:
        log(f"[loop]   {r}")
    switched = switch(cfg, registry, vid) if promote else "not served"
    log(f"[loop] {vid}: {'PROMOTED' if promote else 'REJECTED'} ({switched})")
    return {"event": "promote" if promote else "reject", "version": vid, "parent": parent, "reasons": reasons,
            "metrics": metrics, "data": hashes}

