"""Command-line flags generated from a typed dataclass: the field list is the single source of a command's flags,
defaults, help text and validation.

`TypedArgParser(Cls)` adds one `--flag-name` per field. The help is the docstring written under the field (read
once from the source with `ast`) plus the default; a Literal shows its choices. Values are parsed by the field's
type: `none` for an Optional field; `true/false`, the bare flag or `--no-flag` for a bool; several values (or
`LO,HI`) for tuples and lists. `parse_args` returns a `Cls` instance, and every bad input (an unknown flag, a value
of the wrong type, a failed `__post_init__` check) raises one ConfigError line naming the flag, which `cli_error`
prints before the command exits with status 2.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import types
import typing
from typing import Any, Literal, TypeVar, Union

from igscale.core.typed import ConfigError, coerce

__all__ = ["TypedArgParser", "field_docs", "parse_value", "cli_error"]

T = TypeVar("T")
_NONE = ("none", "null")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: the string literal under it} over the class and its dataclass bases (the class's own text wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (e.g. a frozen install): the flags just have no help text
            continue
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(inspect.cleandoc(b.value.value).split())
    return docs


class _Bad(Exception):
    """A token that does not parse; parse_value prefixes the flag."""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) != len(typing.get_args(tp)):
            return (arms[0] if len(arms) == 1 else Union[tuple(arms)]), True
    return tp, False


def _fixed_tuple(tp: Any) -> tuple | None:
    args = typing.get_args(tp)
    return args if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis else None


def _scalar(text: str, tp: Any) -> Any:
    if typing.get_origin(tp) is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
        raise _Bad(f"{text!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
    if tp is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise _Bad(f"{text!r} is not a boolean (true/false)")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise _Bad(f"{text!r} is not {'an integer' if tp is int else 'a number'}") from None
    if tp in (str, Any):
        return text
    raise TypeError(f"no command-line parser for {tp!r}")  # a schema mistake, not a user error


def _split(tokens: list[str]) -> list[str]:
    return [p.strip() for t in tokens for p in t.split(",")]


def _value(tokens: list[str], tp: Any) -> Any:
    fixed = _fixed_tuple(tp)
    if fixed:  # "LO HI" or "LO,HI"
        parts = _split(tokens)
        if len(parts) != len(fixed):
            raise _Bad(f"expected {len(fixed)} values, got {' '.join(tokens)!r}")
        return tuple(_scalar(p, a) for p, a in zip(parts, fixed))
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        elem = typing.get_args(tp)[0] if typing.get_args(tp) else str
        items = [_value([t], elem) for t in tokens] if _fixed_tuple(elem) else [_scalar(p, elem) for p in
                                                                                 _split(tokens)]
        return tuple(items) if origin is tuple else items
    if len(tokens) != 1:
        raise _Bad(f"expected one value, got {len(tokens)}")
    return _scalar(tokens[0], tp)


def parse_value(raw: str | list[str], tp: Any, flag: str) -> Any:
    """The command-line string(s) of `flag` as a value of type `tp`; a bad value raises ConfigError naming it."""
    tokens = [raw] if isinstance(raw, str) else list(raw)
    base, optional = _strip_optional(tp)
    if optional and len(tokens) == 1 and tokens[0].lower() in _NONE:
        return None
    try:
        return _value(tokens, base)
    except _Bad as e:
        raise ConfigError(f"{flag}: {e}{' (or none)' if optional else ''}") from None


def _metavar(tp: Any, name: str) -> str:
    tp, _ = _strip_optional(tp)
    fixed = _fixed_tuple(tp)
    if fixed:
        return " ".join(_metavar(a, name) for a in fixed)
    if typing.get_origin(tp) in (list, tuple):
        elem = typing.get_args(tp)[0] if typing.get_args(tp) else str
        one = ",".join(_metavar(a, name) for a in _fixed_tuple(elem)) if _fixed_tuple(elem) else _metavar(elem, name)
        return f"{one} [{one} ...]"
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    return {bool: "[BOOL]", int: "INT", float: "FLOAT"}.get(tp, name.upper())


def _show(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return {None: "none", True: "true", False: "false"}[v]
    if isinstance(v, (list, tuple)):
        return " ".join(_show(x) for x in v) or "[]"
    return f"{v!r}" if v == "" else str(v)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and prints each flag's value as one metavar (`--cfg-interval LO HI`)."""

    def _format_args(self, action, default_metavar):
        return getattr(action, "display", None) or super()._format_args(action, default_metavar)


class TypedArgParser(argparse.ArgumentParser):
    """ArgumentParser over the fields of dataclass `cls`; plain `add_argument`s may be added for non-field flags.

    positional: field names taken as optional positional arguments instead of flags.
    """

    def __init__(self, cls: type, *, positional: tuple[str, ...] = (), **kw):
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(**kw)
        self.cls, self.positional = cls, positional
        self._hints = typing.get_type_hints(cls)
        docs, by_owner = field_docs(cls), {}
        for f in dataclasses.fields(cls):  # each field under the (most basic) class that declares it
            if f.init:
                owner = next(k for k in reversed(cls.__mro__) if f.name in vars(k).get("__annotations__", {}))
                by_owner.setdefault(owner, []).append(f)
        for klass in cls.__mro__:  # the command's own fields first, then one group per section (its docstring)
            if klass in by_owner:
                group = self if klass is cls else self.add_argument_group(inspect.getdoc(klass).split("\n")[0])
                for f in by_owner[klass]:
                    self._add_field(group, f, docs.get(f.name, ""))

    def _add_field(self, group, f: dataclasses.Field, doc: str) -> None:
        tp = self._hints[f.name]
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if default is dataclasses.MISSING:
            doc += " (required)"
        elif "default" not in doc.lower():  # a docstring that explains its default says it better
            doc += f" (default: {_show(default)})"
        base, _ = _strip_optional(tp)
        variadic = _fixed_tuple(base) or typing.get_origin(base) in (list, tuple)
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=doc.replace("%", "%%"))
        if f.name in self.positional:
            action = group.add_argument(f.name, nargs="?", metavar=f.name.upper(), **kw)
            action.display = f"[{f.name.upper()}]"
            return
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            kw["help"] += f" (--no-{flag[2:]}: false)"
            group.add_argument(flag, dest=f.name, nargs="?", const="true", **kw).display = "[BOOL]"
            group.add_argument(f"--no-{flag[2:]}", dest=f.name, action="store_const", const="false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            return
        group.add_argument(flag, dest=f.name, nargs="+" if variadic else None, **kw).display = _metavar(tp, f.name)

    def error(self, message: str):  # argparse's own errors (unknown flag, missing value) as one ConfigError line
        raise ConfigError(message)

    def parse_namespace(self, argv: list[str] | None = None) -> argparse.Namespace:
        """The raw namespace: only the fields given on the command line, as strings, plus the plain arguments."""
        return super().parse_args(argv)

    def build(self, ns: argparse.Namespace, base: dict[str, Any] | None = None, *, base_name: str = "config"):
        """`cls` from `base` (e.g. a config file's mapping) with the command-line fields of `ns` on top."""
        names = [f.name for f in dataclasses.fields(self.cls) if f.init]
        base = dict(base or {})
        unknown = sorted(set(base) - set(names))
        if unknown:
            raise ConfigError(f"unknown key(s) in the {base_name}: {unknown}; valid keys: {sorted(names)}")
        data = {k: coerce(v, self._hints[k], k) for k, v in base.items()}
        for name in names:
            if name in vars(ns):
                data[name] = parse_value(getattr(ns, name), self._hints[name], self._flag(name))
        missing = [self._flag(f.name) for f in dataclasses.fields(self.cls) if f.init and f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"missing required {', '.join(missing)}")
        try:
            return self.cls(**data)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from e

    def parse_args(self, args: list[str] | None = None, namespace=None):  # noqa: ARG002 - argparse's signature
        """The `cls` instance of `args` (sys.argv[1:] when None)."""
        return self.build(self.parse_namespace(args))

    def _flag(self, name: str) -> str:
        return name.upper() if name in self.positional else "--" + name.replace("_", "-")


def cli_error(prog: str, err: Exception) -> int:
    """Print a command-line error as one line (with where to look) and return exit status 2."""
    print(f"{prog}: error: {err} (see {prog} --help)", file=sys.stderr)
    return 2
