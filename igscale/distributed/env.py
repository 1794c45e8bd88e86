"""Rank / world size from the launcher's environment, and process-group setup.

Launchers covered: torchrun (and Ray Train, which exports the same RANK/WORLD_SIZE/LOCAL_RANK variables and
creates the process group itself), Slurm `srun` (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), and a plain single
process. Backend: nccl when CUDA is available, gloo otherwise.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "detect_env", "init_distributed", "destroy_distributed", "barrier", "device_for", "print0"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as e:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from e


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank/world/local rank. torchrun-style variables win over Slurm ones (torchrun inside srun)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
    else:
        return DistEnv()
    if not (0 <= rank < world) or local < 0:
        raise ValueError(f"inconsistent launcher environment: rank={rank} world_size={world} local_rank={local}")
    return DistEnv(rank=rank, world_size=world, local_rank=local, launcher=launcher)


def init_distributed(env: DistEnv | None = None, *, timeout_s: float = 1800.0) -> DistEnv:
    """Create the default process group if the launch has >1 rank and none exists yet. Returns the env."""
    env = env or detect_env()
    if env.distributed and not dist.is_initialized():
        if env.launcher == "slurm":
            # srun does not export the rendezvous address; the first node's address is the usual choice.
            os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.setdefault("RANK", str(env.rank))
            os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return env


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device_for(env: DistEnv) -> torch.device:
    """The device this rank should compute on: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (uses the live process group, else the launcher env)."""
    rank = dist.get_rank() if dist.is_initialized() else detect_env().rank
    if rank == 0:
        print(*args, **kwargs, flush=True)
