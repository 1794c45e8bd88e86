"""Typed dataclass construction from plain dicts (YAML, JSON, CLI overrides).

Every config dataclass in igscale is built through `from_dict`, so an unknown key or a value of the wrong
type fails loudly with the dotted path of the offending field instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

__all__ = ["ConfigError", "coerce", "from_dict", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is invalid. The message names the dotted path."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` checked (and where lossless, converted) against type `tp`; `path` names it in errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own message says more than "matches none of"
            try:
                return coerce(value, arms[0], path)
            except ConfigError as e:
                raise ConfigError(f"{e} (or null)") from None
        for a in arms:
            try:
                return coerce(value, a, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, _path=path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} ({value!r})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected bool, got {type(value).__name__} ({value!r})")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {type(value).__name__} ({value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {type(value).__name__} ({value!r})")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], _path: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types.

    Missing keys take the dataclass defaults; `__post_init__` validation then runs as usual.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{_path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {_path}" if _path else ""
        raise ConfigError(
            f"unknown config key(s){where} for {cls.__name__}: {unknown}; valid keys: {sorted(fields)}"
        )
    kwargs = {k: coerce(v, hints[k], f"{_path}.{k}" if _path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{_path or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict of builtins (tuples become lists), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
