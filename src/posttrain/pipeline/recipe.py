"""A recipe: the model, the method and an ordered list of stages, each a stage command's config, resolved into a
plan whose every stage config is validated before anything trains.

Chaining: a policy stage (sft, dpo, kto, grpo, ppo) starts from the previous policy stage's output, its adapter
(LoRA, QLoRA, prompt/prefix tuning: ``adapter=<previous>``, on the same base) or its model (full fine-tuning:
``model=<previous>``). Preference and RL stages take their starting point as the reference (the stages do that
themselves: a continued adapter is its own reference, a full model's reference is a frozen copy of it). An ``rm``
stage trains a reward model on the side: it does not move the policy, and a later stage names its output as
``{stage:NAME}`` (e.g. ``rewards: [{reward_model: "{stage:rm}"}]``).

A stage's fingerprint hashes its resolved config (without output_dir), the content of its data files, and the
fingerprints of the stages it depends on (its parent policy stage and every ``{stage:NAME}`` it names): a stage
whose fingerprint is unchanged since it finished is not trained again, and a changed stage changes every later
fingerprint along its chain.

Paths: ``config:``, ``data.train``, ``data.eval`` and the ``evals:`` files are relative to the recipe's folder
(absolute paths are used as they are).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from posttrain.config import _merge, build, opt, parse_overrides, section
from posttrain.errors import ConfigError
from posttrain.evals.suite import EvalsSection
from posttrain.methods import ADAPTER_METHODS

STAGE_KINDS = ("sft", "dpo", "kto", "rm", "grpo", "ppo")
POLICY_KINDS = ("sft", "dpo", "kto", "grpo", "ppo")
RECIPE_ONLY = {"name", "stage", "config", "improves", "gates"}
STAGE_REF = re.compile(r"\{stage:([A-Za-z0-9_.-]+)\}")


@dataclass
class GatesConfig:
    min_task_gain: float = opt(0.0, "A stage's target tasks (its `improves`) must beat the previous policy's by more than this (in the metric's better direction).")
    max_task_drop: float = opt(0.05, "Every other task may be worse than after the previous policy stage by at most this (absolute): a stage keeps the earlier stages' gains.")
    max_general_drop: float = opt(0.1, "general/accuracy may fall below the base model's by at most this (absolute).")
    max_perplexity_increase: float = opt(0.5, "general/perplexity may rise above the base model's by at most this (relative: 0.5 = 50%).")
    max_kl: float = opt(1.0, "general/kl_to_base (nats per token) may be at most this.")
    max_sycophancy_increase: float = opt(0.1, "sycophancy/agrees may rise above the base model's by at most this (absolute).")
    guard_stop_fails: bool = opt(True, "An RL stage that a reward-hacking guard stopped fails its gate (its kept policy is still saved).")
    on_fail: Literal["stop", "warn"] = opt("stop", "stop: a failed gate ends the pipeline (every finished stage's output is kept); warn: report it and go on.")


@dataclass
class RecipeConfig:
    name: str | None = opt(None, "A title for the report (default: the recipe file's name).")
    model: str = opt("smollm2-135m", "Base model of the first stage: 'smollm2-135m' (embedded), a local HF directory, or a hub id.")
    method: Literal["full", "lora", "qlora", "prompt", "prefix"] = opt("lora", "How every stage updates parameters (a stage may set its own `method`, on the same chain: an adapter method cannot follow a full one's output without a merge).")
    output_dir: str = opt("runs/pipeline", "Folder of the run: one sub-folder per stage (its standard output), evals/, report.md/.html/.png.")
    seed: int = opt(42, "Seed of every stage (a stage may set its own).")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    launcher: str = opt("", "Command prefix each stage runs under, e.g. 'accelerate launch --num_processes 2' or 'torchrun --nproc_per_node 4' (empty: this Python).")
    defaults: dict = opt({}, "Keys every stage gets unless it sets them itself (e.g. {lora: {r: 16}, max_length: 256}).")
    stages: list[dict] = opt([], "The stages in order: items {name, stage (sft|dpo|kto|rm|grpo|ppo; default: the name), config (a stage YAML file, optional), improves (the evals.tasks it must improve), ...any key of that stage's command}.")
    evals: EvalsSection = section(EvalsSection, "What is measured on the base model and after every policy stage.")
    gates: GatesConfig = section(GatesConfig, "What a stage must achieve to let the next one start.")


@dataclass
class PlannedStage:
    name: str
    kind: str
    config: object  # the stage command's validated config
    values: dict  # the resolved config as a mapping (what is written to <stage>.yaml)
    parent: str | None  # the policy stage it starts from (None: the base model)
    improves: list[str]
    depends: list[str] = field(default_factory=list)  # stages named by {stage:NAME}
    fingerprint: str = ""

    @property
    def policy(self) -> bool:
        return self.kind in POLICY_KINDS

    @property
    def output_dir(self) -> Path:
        return Path(self.values["output_dir"])


@dataclass
class Plan:
    recipe: RecipeConfig
    path: Path
    stages: list[PlannedStage]

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def title(self) -> str:
        return self.recipe.name or self.path.stem

    def stage(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)

    def evals_fingerprint(self) -> str:
        """Hash of what the evaluations measure: the evals section and the content of its files."""
        from posttrain.evals.suite import resolve

        files = {}
        for key in ("general_questions", "general_text", "sycophancy"):
            p = resolve(getattr(self.recipe.evals, key), key, self.path.parent)
            files[key] = hash_path(p) if p is not None and p.exists() else None
        for task in self.recipe.evals.tasks:
            p = resolve(task.get("prompts") or task.get("data"), "", self.path.parent)
            files[task["name"]] = hash_path(p) if p.exists() else None
        return _digest({"evals": _plain(self.recipe.evals), "files": files, "model": self.recipe.model})


def _plain(obj) -> object:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_path(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in name order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        if p != path:
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what}: {path} not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return values


def _split_overrides(overrides: list[str], stage_names: set[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``dpo.beta=0.2`` -> stage dpo's override ``beta=0.2``; ``gates.max_kl=2`` -> the recipe's."""
    top, per_stage = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}': expected key=value, e.g. dpo.beta=0.2 or output_dir=runs/x")
        head, dot, rest = key.partition(".")
        if head in stage_names and dot:
            per_stage.setdefault(head, []).append(f"{rest}={value}")
        elif head in stage_names:
            raise ConfigError(f"override '{item}': '{head}' is a stage; set one of its keys, e.g. {head}.max_steps=10")
        else:
            top.append(item)
    return top, per_stage


def load_plan(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Read a recipe, apply overrides, and resolve and validate every stage's config (no compute, no loading)."""
    path = Path(path)
    raw = _read_yaml(path, "recipe")
    names = {str(s.get("name") or s.get("stage")) for s in raw.get("stages") or [] if isinstance(s, dict)}
    top, per_stage = _split_overrides(overrides or [], names)
    raw = _merge(raw, parse_overrides(top))
    recipe: RecipeConfig = build(RecipeConfig, raw)
    recipe.evals.validate("evals")
    if not recipe.stages:
        raise ConfigError(f"{path}: stages: required, a list of stages, e.g. [{{stage: sft, data: {{train: train.jsonl}}}}]")
    unknown = set(per_stage) - names
    if unknown:
        raise ConfigError(f"overrides for unknown stage(s) {sorted(unknown)}")
    base_dir = path.parent
    task_names = [t["name"] for t in recipe.evals.tasks]
    out = Path(recipe.output_dir)
    planned: list[PlannedStage] = []
    seen: set[str] = set()
    policy: tuple[str, str | None, str] | None = None  # (model, adapter, method) of the latest policy stage
    for i, item in enumerate(recipe.stages):
        where = f"stages[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping {{stage: sft, ...}}, got {item!r}")
        kind = str(item.get("stage") or item.get("name") or "")
        name = str(item.get("name") or kind)
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{where}.stage: expected one of {', '.join(STAGE_KINDS)}, got {kind!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in ("evals", "gates", "report") or name in seen:
            raise ConfigError(f"{where}.name: {name!r} must be unique, letters, digits, '-' or '_', and not evals/gates/report")
        where = f"stage '{name}'"
        seen.add(name)
        values: dict = copy.deepcopy(recipe.defaults)
        if item.get("config"):
            cfg_path = _relative(item["config"], base_dir)
            values = _merge(values, _read_yaml(cfg_path, f"{where}.config"))
        values = _merge(values, {k: copy.deepcopy(v) for k, v in item.items() if k not in RECIPE_ONLY})
        values = _merge(values, parse_overrides(per_stage.get(name, [])))
        for key in ("output_dir", "resume"):
            if key in values:
                raise ConfigError(f"{where}.{key}: set by the pipeline ({recipe.output_dir}/{name}); remove it")
        values["output_dir"] = str(out / name)
        values.setdefault("seed", recipe.seed)
        values.setdefault("method", recipe.method)
        values.setdefault("trust_remote_code", recipe.trust_remote_code)
        data = values.get("data")
        if isinstance(data, dict):
            for key in ("train", "eval"):
                if isinstance(data.get(key), str):
                    data[key] = str(_relative(data[key], base_dir))
        depends = sorted(set(STAGE_REF.findall(json.dumps(values))))
        for dep in depends:
            if dep not in seen - {name}:
                raise ConfigError(f"{where}: {{stage:{dep}}} names no earlier stage")
        values = _substitute(values, {d: str(out / d) for d in depends})
        parent = None
        if kind in POLICY_KINDS:
            if "model" in values and policy is not None:
                raise ConfigError(f"{where}.model: a later policy stage starts from the previous one's output; remove model")
            if policy is None:
                values.setdefault("model", recipe.model)
            else:
                model, adapter, parent = policy
                prev_method = next(s for s in planned if s.name == parent).values["method"]
                values["model"] = model
                if values["method"] in ADAPTER_METHODS:
                    if adapter is not None:
                        if values["method"] in ("prompt", "prefix") or prev_method in ("prompt", "prefix"):
                            if values["method"] != prev_method:
                                raise ConfigError(f"{where}.method: {values['method']} cannot continue stage '{parent}''s "
                                                  f"{prev_method} adapter; use the same method")
                        values["adapter"] = adapter
                elif adapter is not None:
                    raise ConfigError(f"{where}.method: full fine-tuning cannot start from stage '{parent}''s adapter; "
                                      f"use an adapter method, or merge it first (`posttrain merge`) and start a new recipe from the merged model")
        else:
            values.setdefault("model", recipe.model)
        improves = item.get("improves")
        if improves is None:
            improves = task_names if (kind in POLICY_KINDS and len(task_names) == 1) else []
            if kind in POLICY_KINDS and len(task_names) > 1:
                raise ConfigError(f"{where}.improves: say which evals.tasks this stage must improve "
                                  f"(some of {task_names}), or improves: [] for none")
        if not isinstance(improves, list) or any(t not in task_names for t in improves):
            raise ConfigError(f"{where}.improves: expected a list of evals.tasks names ({task_names}), got {improves!r}")
        if kind == "rm" and improves:
            raise ConfigError(f"{where}.improves: an rm stage trains a reward model, not the policy; remove improves")
        config = _stage_config(kind, values, where)
        stage = PlannedStage(name, kind, config, values, parent, improves, depends)
        if kind in POLICY_KINDS:
            adapter_out = values["method"] in ADAPTER_METHODS
            policy = (values["model"] if adapter_out else str(out / name), str(out / name) if adapter_out else None, name)
        planned.append(stage)
    plan = Plan(recipe, path, planned)
    _fingerprint(plan)
    return plan


def _relative(value: str, base_dir: Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base_dir / p


def _substitute(obj, outputs: dict[str, str]):
    if isinstance(obj, str):
        return STAGE_REF.sub(lambda m: outputs[m.group(1)], obj)
    if isinstance(obj, list):
        return [_substitute(v, outputs) for v in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, outputs) for k, v in obj.items()}
    return obj


def _stage_config(kind: str, values: dict, where: str):
    from posttrain.commands import command

    try:
        config = build(command(kind).Config, values)
        config.validate()
    except ConfigError as e:
        raise ConfigError(f"{where} ({kind}): {e}") from None
    return config


def _fingerprint(plan: Plan) -> None:
    fps: dict[str, str] = {}
    for stage in plan.stages:
        values = {k: v for k, v in stage.values.items() if k != "output_dir"}
        data = {}
        for key in ("train", "eval"):
            p = (stage.values.get("data") or {}).get(key)
            if p and Path(p).exists():
                data[key] = hash_path(p)
        deps = {d: fps[d] for d in [stage.parent, *stage.depends] if d}
        stage.fingerprint = fps[stage.name] = _digest({"kind": stage.kind, "values": values, "data": data, "deps": deps})
