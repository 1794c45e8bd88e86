"""Shared plumbing of the distributed CLI commands: process group set-up/tear-down and user-error reporting."""
from __future__ import annotations

import sys
from collections.abc import Callable

from igscale.distributed.env import DistEnv, destroy_distributed, init_distributed
from igscale.storage import USER_ERRORS


def run_distributed(prog: str, run: Callable[[DistEnv], int], *, timeout_s: float | None = None) -> int:
    """Init the process group (torchrun / Slurm / Ray / single process), run, and always tear down.

    A user error (bad input, missing file, storage failure) prints one line and exits 2 instead of a traceback.
    """
    env = init_distributed(timeout_s=timeout_s) if timeout_s is not None else init_distributed()
    try:
        return run(env)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()


def typed_main(prog: str, build_parser: Callable, run: Callable, argv: list[str] | None,
               timeout_s: float | None = 4 * 3600) -> int:
    """Parse `argv` into the command's typed config (a bad flag: one line, exit 2, before any process group),
    then `run(config, env)` under `run_distributed`."""
    from igscale.core.cli_args import cli_error
    from igscale.core.typed import ConfigError

    try:
        args = build_parser().parse_args(argv)
    except ConfigError as e:
        return cli_error(prog, e)
    return run_distributed(prog, lambda env: run(args, env), timeout_s=timeout_s)
