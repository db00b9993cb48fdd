"""The config machinery every command uses: typed dataclass fields with their help, YAML plus dotted overrides.

Each field is documented once, in its ``help`` metadata; ``posttrain <stage> --help`` renders the same
text with the defaults. A config comes from an optional YAML file plus dotted ``key=value`` overrides
(``lora.r=32``); values in overrides are parsed as YAML scalars (``true``, ``3e-4``, ``[q_proj, v_proj]``).
Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from posttrain.errors import ConfigError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its one line of documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------------------------- parsing
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        raise AssertionError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; `posttrain <stage> --help` lists the keys")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section of keys, got {value!r}")
            kwargs[key] = build(tp, value, dotted + ".")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["lora.r=32", "data.train=x.jsonl"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value, e.g. lora.r=32")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("[", "{")):
            value = raw  # e.g. "a: b" is a string here, not a mapping
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(cls: type, path: str | Path | None, overrides: list[str] | None = None, what: str = "options") -> Any:
    """``cls`` from an optional YAML file of ``what`` plus dotted overrides, unvalidated (for commands whose
    configs are not stages: data clean/synth, loop, rollback)."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of {what}")
    return build(cls, _merge(values, parse_overrides(overrides or [])))


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Build and validate a ``cls`` from an optional YAML file and dotted overrides (a command's keys)."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        values = loaded or {}
    values = _merge(values, parse_overrides(overrides or []))
    config = build(cls, values)
    if hasattr(config, "validate"):
        config.validate()
    return config


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def help_table(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, sections expanded."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(help_table(tp, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", "null" if default is None else str(default), f.metadata.get("help", "")))
    return rows

