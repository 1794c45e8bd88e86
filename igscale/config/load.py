"""Load a RunConfig from YAML plus dotted `key=value` overrides, and save the resolved result.

    cfg = load_config("configs/sit_xl2_ig.yaml", ["train.global_batch=512", "engine.zero_stage=3"])

A YAML file may name one parent with `base: other.yaml` (resolved relative to the file); the child's keys are
deep-merged over it. Override values are parsed as YAML scalars/lists (`1e-4`, `true`, `[0.9, 0.95]`, `null`), and
the final dict goes through `typed.from_dict`, so unknown keys and wrong types are rejected with the dotted path.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml

from igscale.config.schema import RunConfig
from igscale.core.typed import ConfigError, from_dict, to_dict

__all__ = ["load_config", "config_from_dict", "parse_overrides", "save_config", "config_to_yaml"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`, and silently gives a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _deep_merge(base: dict, over: dict) -> dict:
    """Field-by-field merge: a child or override that sets `model.depth` keeps the other model fields."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: str, _depth: int = 0) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = _yaml(f.read())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from e
    if data is None:
        raise ConfigError(f"{path} is empty: a run config needs at least model and data sections "
                          "(see configs/*.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if _depth >= 1:
            raise ConfigError(f"{path}: only one level of `base:` is allowed")
        parent = _read_yaml(os.path.join(os.path.dirname(path), base), _depth + 1)
        data = _deep_merge(parent, data)
    return data


def parse_overrides(items: list[str]) -> dict:
    """["a.b=1", "c=[1,2]"] -> {"a": {"b": 1}, "c": [1, 2]} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is both a value and a section")
        node[parts[-1]] = value
    return out


def config_from_dict(data: dict) -> RunConfig:
    model = data.get("model")
    if isinstance(model, dict) and "overrides" in model:  # configs written before ModelSection had typed fields
        raise ConfigError("model.overrides: the model's fields now sit directly under model (e.g. model.depth=3, "
                          "`model: {name: SiT-S/2, depth: 3}`); move the keys of model.overrides up one level")
    return from_dict(RunConfig, data)


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    data = _read_yaml(path) if path else {}
    data = _deep_merge(data, parse_overrides(list(overrides)))
    return config_from_dict(data)


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config; reloading it with `load_config(path)` gives an equal RunConfig."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config_to_yaml(cfg))
    os.replace(tmp, path)
