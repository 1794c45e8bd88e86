"""`igscale <command> [args]`: a thin dispatcher; each command lives in its own module (igscale/cli/<command>.py)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys

COMMANDS = {
    "precompute": "igscale.cli.precompute",
    "train": "igscale.cli.train",
    "export": "igscale.cli.export",
    "sample": "igscale.cli.sample",
    "eval": "igscale.cli.evaluate",
    "sweep": "igscale.cli.sweep",
    "reproduce": "igscale.cli.reproduce",
    "tune": "igscale.cli.tune",
    "demo": "igscale.demo.run",
}  # in workflow order, as `igscale --help` lists them


def version() -> str:
    """The installed distribution's version; setup.cfg's in a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("igscale")
    except PackageNotFoundError:
        import configparser
        import pathlib

        cfg = configparser.ConfigParser()
        cfg.read(pathlib.Path(__file__).resolve().parents[2] / "setup.cfg")
        return cfg.get("metadata", "version", fallback="unknown")


def summary(module: str) -> str:
    """First line of a command module's docstring, read from its source: importing every command (torch, Ray)
    would make `igscale --help` take seconds."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.origin:
        return "(not available in this build)"
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return re.sub(r"^`[^`]*`:\s*", "", doc.split("\n")[0])  # drop the "`igscale cmd ...`:" lead


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary(mod)}" for name, mod in COMMANDS.items()]
    return ("usage: igscale <command> [options]\n       igscale --version\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`igscale <command> --help` lists a command's options, their defaults and what they do.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"igscale {version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"igscale: unknown command {cmd!r}; valid commands: {', '.join(COMMANDS)} (see igscale --help)",
              file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[cmd])
    except ModuleNotFoundError as e:
        if e.name == COMMANDS[cmd]:
            print(f"igscale: command {cmd!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
