"""`igscale <command> [args]`: a thin dispatcher; each command lives in igscale/cli/<command>.py."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "igscale.cli.train",
    "sample": "igscale.cli.sample",
    "eval": "igscale.cli.evaluate",
    "sweep": "igscale.cli.sweep",
    "export": "igscale.cli.export",
    "demo": "igscale.demo.run",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: igscale <command> [options]\n\ncommands:\n  " + "\n  ".join(sorted(COMMANDS)))
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"igscale: unknown command {cmd!r}; valid commands: {sorted(COMMANDS)}", file=sys.stderr)
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
