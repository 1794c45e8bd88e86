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
