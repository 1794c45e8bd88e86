"""Shared plumbing of the distributed CLI commands: process group set-up/tear-down and user-error reporting."""
from __future__ import annotations

import sys
from collections.abc import Callable

from igscale.distributed.env import DistEnv, destroy_distributed, init_distributed
from igscale.io.storage import StorageError

try:  # wrong credentials, a missing bucket, an unreachable endpoint: one line, not a botocore traceback
    from botocore.exceptions import BotoCoreError, ClientError

    _S3_ERRORS: tuple = (BotoCoreError, ClientError)
except ImportError:  # boto3 is optional for local-only use
    _S3_ERRORS = ()

USER_ERRORS = (ValueError, FileNotFoundError, StorageError, *_S3_ERRORS)


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
