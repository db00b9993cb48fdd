"""``posttrain compare``: one SFT config trained under several parameter-update methods (full, lora, qlora, prompt,
prefix by default), each from the base model, measured side by side on the user's model and data, next to what
``posttrain plan`` predicted for the same settings.

Measured per method: wall time of the training process and its trained tokens per second (target tokens over the
summed step time, from metrics.jsonl), the process's peak memory (max RSS from ``wait4``; on a GPU the device
memory is not included), trainable parameters and the size on disk of the saved weights (both read from the
saved safetensors: the adapter, or the whole model), the task metric(s) and the forgetting metrics of
posttrain.evals (base model first). Predicted: trainable parameters, peak memory and output size from
posttrain.plan.memory.estimate with the run's settings. Writes ``compare.md``, ``compare.json`` and
``compare.png`` under the output folder.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.config import _merge, build, parse_overrides
from posttrain.errors import ConfigError
from posttrain.evals.suite import EvalsSection
from posttrain.methods import METHODS
from posttrain.pipeline.run import STATE, _say, run_command

DEFAULT_METHODS = list(METHODS)


@dataclass
class CompareSpec:
    methods: list[str]
    values: dict  # the SFT config (output_dir = the comparison's folder)
    overrides: dict  # method -> keys that method gets on top (e.g. a full fine-tuning learning rate)
    evals: EvalsSection
    base_dir: Path
    configs: dict  # method -> validated SFTConfig


def load_spec(path: str | None, overrides: list[str]) -> CompareSpec:
    """The SFT config of ``path`` plus overrides; ``methods`` and ``evals`` are the comparison's own keys. Every
    method's config is validated before anything trains."""
    from posttrain.commands import command

    values: dict = {}
    base_dir = Path(".")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    values = _merge(values, parse_overrides(overrides))
    methods = values.pop("methods", DEFAULT_METHODS)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ConfigError(f"methods: expected a list of distinct methods from {', '.join(METHODS)}, got {methods!r}")
    overrides = values.pop("method_overrides", {}) or {}
    if not isinstance(overrides, dict) or any(m not in METHODS or not isinstance(v, dict) for m, v in overrides.items()):
        raise ConfigError(f"method_overrides: expected {{method: {{key: value}}}} with methods from {', '.join(METHODS)}, got {overrides!r}")
    evals = build(EvalsSection, values.pop("evals", {}) or {}, "evals.")
    values.setdefault("output_dir", "runs/compare")
    if not evals.tasks and (values.get("data") or {}).get("eval"):
        evals.tasks = [{"name": "eval", "data": values["data"]["eval"]}]
    evals.validate("evals")
    configs = {}
    for m in methods:
        v = method_values(values, m, overrides)
        try:
            cfg = build(command("sft").Config, v)
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"method {m}: {e}") from None
        configs[m] = cfg
    return CompareSpec(methods, values, overrides, evals, base_dir, configs)


def method_values(values: dict, method: str, overrides: dict | None = None) -> dict:
    v = _merge(copy.deepcopy(values), copy.deepcopy((overrides or {}).get(method, {})))
    v["method"] = method
    v["output_dir"] = str(Path(values["output_dir"]) / method)
    return v


def saved_weights(out: Path) -> tuple[int, int]:
    """(parameters, bytes) of the safetensors files at the top of a saved model or adapter folder."""
    from safetensors import safe_open

    params, size = 0, 0
    for f in sorted(out.glob("*.safetensors")):
        size += f.stat().st_size
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                params += _numel(st.get_slice(key).get_shape())
    return params, size


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def trained_tokens_per_s(out: Path) -> float | None:
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    units = sum(r.get("train/units", 0.0) for r in rows)
    seconds = sum(r.get("train/step_seconds", 0.0) for r in rows)
    return units / seconds if seconds else None


def predicted(cfg) -> dict:
    """What ``posttrain plan`` predicts for this SFT config (device: cuda if visible, else cpu)."""
    import torch

    from posttrain.plan.memory import estimate
    from posttrain.plan.shapes import load_shape

    shape = load_shape(cfg.model)
    num_virtual = cfg.prompt.num_virtual_tokens if cfg.method == "prompt" else cfg.prefix.num_virtual_tokens
    est = estimate(shape, cfg.method, seq_len=cfg.max_length, batch_size=cfg.batch_size,
                   precision="auto" if cfg.precision == "auto" else cfg.precision,
                   device="cuda" if torch.cuda.is_available() else "cpu", lora_r=cfg.lora.r,
                   lora_targets=cfg.lora.target_modules, num_virtual_tokens=num_virtual,
                   gradient_checkpointing=cfg.gradient_checkpointing, packing=cfg.packing,
                   loss_chunk_size=cfg.loss_chunk_size)
    return {"trainable_params": est.trainable_params, "peak_bytes": est.total, "output_bytes": est.output_bytes}


def run(spec: CompareSpec) -> dict:
    from posttrain.evals.suite import Evaluator
    from posttrain.models.adapters import load_for_inference
    from posttrain.models.loading import load_tokenizer

    root = Path(spec.values["output_dir"])
    root.mkdir(parents=True, exist_ok=True)
    first = spec.configs[spec.methods[0]]
    tokenizer = load_tokenizer(first.model, trust_remote_code=first.trust_remote_code)
    rows = []
    with Evaluator(spec.evals, tokenizer, spec.base_dir, "evals") as evaluator:
        _say(f"compare: evaluate the base model {first.model} ...")
        base_model = load_for_inference(first.model, None, first.trust_remote_code)
        base = evaluator.evaluate(base_model, progress=lambda t: _say(f"  base: {t}"))
        for method in spec.methods:
            cfg = spec.configs[method]
            out = Path(cfg.output_dir)
            seconds, peak = run_command(method, "sft", method_values(spec.values, method, spec.overrides),
                                        root / STATE / f"{method}.yaml")
            params, size = saved_weights(out)
            adapter = method != "full"
            model = load_for_inference(cfg.model if adapter else str(out), str(out) if adapter else None, cfg.trust_remote_code)
            _say(f"compare: evaluate {method} ...")
            ev = evaluator.evaluate(model, base=None if adapter and method != "qlora" else base_model,
                                    progress=lambda t, m=method: _say(f"  {m}: {t}"))
            del model
            rows.append({"method": method, "seconds": round(seconds, 1), "trained_tokens_per_s": trained_tokens_per_s(out),
                         "peak_rss_bytes": peak, "trainable_params": params,
                         "saved_bytes": size, "metrics": ev["metrics"], "predicted": predicted(cfg)})
    result = {"base": base["metrics"], "rows": rows, "config": spec.values, "evals": spec.evals.metric_names(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    (root / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    text = table(result)
    (root / "compare.md").write_text(text + "\n")
    figure(result, root / "compare.png")
    print(text)
    _say(f"compare: {root / 'compare.md'}, {root / 'compare.json'}, {root / 'compare.png'}")
    return result


def _mb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


def _count(n) -> str:
    return "-" if n is None else (f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}")


def table(result: dict) -> str:
    from posttrain.evals.suite import higher_is_better

    metrics = result["evals"]
    header = (["method", "wall s", "trained tok/s", "peak memory (plan)", "trainable (plan)", "saved (plan)"]
              + [f"{m} {'↑' if higher_is_better(m) else '↓'}" for m in metrics])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| base | - | - | - | - | - | " + " | ".join(f"{result['base'].get(m, float('nan')):.3f}" for m in metrics) + " |")
    for r in result["rows"]:
        p = r["predicted"]
        tps = "-" if r["trained_tokens_per_s"] is None else f"{r['trained_tokens_per_s']:,.0f}"
        cells = [r["method"], f"{r['seconds']:.0f}", tps, f"{_mb(r['peak_rss_bytes'])} ({_mb(p['peak_bytes'])})",
                 f"{_count(r['trainable_params'])} ({_count(p['trainable_params'])})",
                 f"{_mb(r['saved_bytes'])} ({_mb(p['output_bytes'])})"]
        cells += [f"{r['metrics'].get(m, float('nan')):.3f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["method"] for r in rows]
    panels = [("wall time (s)", [r["seconds"] for r in rows]),
              ("peak memory (MB)", [(r["peak_rss_bytes"] or 0) / 2**20 for r in rows]),
              ("trainable params (M)", [r["trainable_params"] / 1e6 for r in rows]),
              ("saved (MB)", [r["saved_bytes"] / 2**20 for r in rows])]
    panels += [(m, [r["metrics"].get(m, float("nan")) for r in rows]) for m in result["evals"]]
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.6 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, values) in zip(flat, panels):
        ax.bar(names, values, color="tab:blue")
        if title in result["base"]:
            ax.axhline(result["base"][title], color="gray", ls="--", lw=1, label="base")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    for ax in flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
