"""Setting up and finishing an RL run: the parts ``posttrain grpo`` and ``posttrain ppo`` share.

Order matters for the user (as in every stage): prompts are read and validated, reward sources and guard rules
are checked (a typo in a reward reference fails here, not after a model load), then the model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from posttrain.data.prompts import PromptExample, load_prompt_dataset
from posttrain.engine.setup import (
    build,
    finish,
    load_tokenizer_for,
    make_accelerator,
    parallel,
    reference_for,
    say,
)
from posttrain.methods import can_pack
from posttrain.models.loading import eos_token_ids, unwrap
from posttrain.models.reference import drop_reference_adapter
from posttrain.rewards.registry import RewardSet
from posttrain.rl.guards import GuardMonitor, parse_rules

if TYPE_CHECKING:
    from posttrain.commands.base import RLConfig


@dataclass
class RLSetup:
    accelerator: object
    tokenizer: object
    model: torch.nn.Module
    train: list[PromptExample]
    eval: list[PromptExample] | None
    rewards: RewardSet
    guard_rewards: RewardSet | None
    monitor: GuardMonitor
    reference: object
    capacity: int | None
    sampler: object = None  # the vLLM rollout engine (rollout.engine=vllm); None: the built-in one


@dataclass
class RLResult:
    output_dir: Path
    fit: object
    model: torch.nn.Module
    report: Path
    stopped: str | None


def setup_rl(cfg: RLConfig, value_head: bool = False, needs_reference: bool = True) -> RLSetup:
    """``needs_reference``: whether the stage needs reference log-probs (else no reference pass and no frozen copy)."""
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer_for(cfg)
    kw = dict(max_prompt_length=cfg.max_prompt_length, skip_invalid=cfg.data.skip_invalid)
    train, report = load_prompt_dataset(cfg.data.train, tokenizer, **kw)
    say(accelerator, f"prompts: {report.summary()}")
    eval_rows = None
    if cfg.data.eval:
        eval_rows, eval_report = load_prompt_dataset(cfg.data.eval, tokenizer, **kw)
        say(accelerator, f"held-out prompts: {eval_report.summary()}")
    monitor = GuardMonitor(parse_rules(cfg.guards.rules), window=cfg.guards.window)
    if cfg.guards.rewards and not eval_rows:
        from posttrain.errors import ConfigError

        raise ConfigError("guards.rewards: held-out guard rewards are scored on data.eval prompts; set data.eval")
    device = accelerator.device
    rewards = RewardSet.from_config(cfg.rewards, "rewards", device=device)
    guard_rewards = RewardSet.from_config(cfg.guards.rewards, "guards.rewards", device=device) if cfg.guards.rewards else None
    say(accelerator, "rewards: " + ", ".join(f"{s.name} (x{s.weight:g})" for s in rewards.sources)
        + ("; guards: " + ", ".join(s.name for s in guard_rewards.sources) if guard_rewards else ""))

    if cfg.rollout.engine == "vllm":
        check_vllm_setup(cfg, accelerator)
    setup = build(cfg, tokenizer, accelerator)
    model = setup.model
    reference = reference_for(cfg, model, accelerator, needed=needs_reference)
    capacity = cfg.max_prompt_length + cfg.sampling.max_new_tokens if cfg.packing and can_pack(cfg.method) else None
    sampler = vllm_sampler(cfg, tokenizer, model, accelerator) if cfg.rollout.engine == "vllm" else None
    return RLSetup(accelerator, tokenizer, model, train, eval_rows, rewards, guard_rewards, monitor, reference, capacity,
                   sampler)


def check_vllm_setup(cfg: RLConfig, accelerator) -> None:
    """What rollout.engine=vllm cannot do, refused before the model loads."""
    from posttrain.errors import ConfigError
    from posttrain.vllm_backend import require_vllm

    if accelerator.num_processes > 1:
        raise ConfigError("rollout.engine=vllm: runs with one training process in this version (each process would "
                          "hold its own engine); use one process, or rollout.engine=builtin with several")
    if cfg.rollout.vllm.mode == "colocate" or not cfg.rollout.vllm.server_url:
        require_vllm("rollout.engine=vllm")


def vllm_sampler(cfg: RLConfig, tokenizer, model, accelerator):
    """The vLLM rollout engine for this run (its start-up time is reported)."""
    from posttrain.models.loading import resolve_model
    from posttrain.rl.vllm_rollout import VLLMRolloutSampler

    v = cfg.rollout.vllm
    say(accelerator, f"rollout engine: vLLM ({v.mode}{', ' + v.server_url if v.server_url else ''}); starting ...")
    sampler = VLLMRolloutSampler(
        tokenizer, model_path=resolve_model(cfg.model), section=v, method=cfg.method, lora_rank=cfg.lora.r,
        mixed_precision=accelerator.mixed_precision, max_model_len=cfg.max_prompt_length + cfg.sampling.max_new_tokens,
        seed=cfg.seed, sync_dir=v.sync_dir or str(Path(cfg.output_dir) / "vllm-sync"),
        eos_token_ids=eos_token_ids(tokenizer, model), trust_remote_code=cfg.trust_remote_code, log_dir=cfg.output_dir)
    say(accelerator, f"rollout engine: vLLM ready in {sampler.start_seconds:.1f} s")
    return sampler


def objective_parts(s: RLSetup) -> dict:
    """The keyword arguments every RL objective takes from the setup."""
    return dict(tokenizer=s.tokenizer, reference=s.reference, rewards=s.rewards, guard_rewards=s.guard_rewards,
                monitor=s.monitor, capacity=s.capacity, accelerator=s.accelerator, eval_examples=s.eval,
                eos_ids=eos_token_ids(s.tokenizer, s.model), sampler=s.sampler)


def fit_rl(cfg: RLConfig, s: RLSetup, objective, what: str):
    """Run the engine on ``objective`` (``what`` describes the algorithm's settings); returns (engine, fit)."""
    from posttrain.engine.trainer import Engine

    engine = Engine(cfg, s.model, s.train, lambda rows: rows, s.eval, s.accelerator)
    say(s.accelerator, f"training {engine.total_steps} steps of {engine.global_batch} prompts x {cfg.num_generations} "
                       f"completions, {what} ({parallel(cfg, s.accelerator)})")
    return engine, engine.fit(objective)



def finish_rl(cfg: RLConfig, s: RLSetup, engine, fit, objective, title: str, extra_save=None) -> RLResult:
    """Keep the right weights, save them, write the report. After a guard stop the saved policy is the last one
    whose rollout passed every guard (when ``guards.keep_good``), and ``guard_stop.json`` says why."""
    from posttrain.rl.report import write_report

    acc = s.accelerator
    model = engine.model
    kept_step = None
    if fit.stopped is not None:
        if objective.good is not None:
            step, weights = objective.good
            params = dict(unwrap(model).named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value.to(params[name].device))
            kept_step = step + 1
            say(acc, f"guard stop: restored the policy of step {kept_step}, the last that passed every guard")
        else:
            say(acc, "guard stop: no step passed every guard; saving the current policy (see the report)")
        if acc.is_main_process:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "guard_stop.json").write_text(json.dumps(
                {"reason": fit.stopped, "stopped_at_step": fit.steps + 1, "kept_step": kept_step}, indent=2))
    drop_reference_adapter(model)
    out = finish(engine, fit, s.tokenizer, cfg, acc, "adapter" if cfg.method != "full" else "model")
    if extra_save is not None and acc.is_main_process:
        extra_save(out)
    report = Path(cfg.output_dir) / "report.md"
    if acc.is_main_process:
        history = s.monitor.history
        last = history[-1] if history else {}
        summary = {"stage": title, "steps": str(fit.steps), "method": cfg.method,
                   "rewards": ", ".join(f"{x.name} x{x.weight:g}" for x in s.rewards.sources)}
        if s.guard_rewards is not None:
            summary["guard rewards"] = ", ".join(x.name for x in s.guard_rewards.sources)
        timing = fit.history[-1] if fit.history else last
        summary["rollout engine"] = objective.sampler.engine_name
        for key in ("rollout/tokens_per_s", "rollout/share", "rollout/sync_seconds", "rollout/logp_gap"):
            if key in timing:
                summary[key] = f"{timing[key]:.3g}"
        if fit.eval_metrics:
            summary.update({f"final held-out {k}": f"{v:.4g}" for k, v in fit.eval_metrics.items()})
        report, png = write_report(cfg.output_dir, history, s.monitor.events, title=f"posttrain {title}: {cfg.output_dir}",
                                   summary=summary, stopped_step=(fit.steps + 1) if fit.stopped else None, kept_step=kept_step)
        say(acc, f"report: {report} and {png}")
    s.rewards.close()
    objective.sampler.close()
    if s.guard_rewards is not None:
        s.guard_rewards.close()
    return RLResult(out, fit, model, report, fit.stopped)
