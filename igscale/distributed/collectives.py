"""The one place igscale's own collectives go through, with tensors placed for the process group's backend.

NCCL reduces CUDA tensors only and gloo CPU tensors (gloo's CUDA support is partial and slow), so every helper moves
its input to `backend_device()` first and returns the result there. Without a process group they are identities, so
single-process code paths need no special case; a group of one still runs the collective (its placement is tested).
`calls` counts the collectives issued through this module (tests assert one per optimizer step).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["backend_device", "all_reduce", "all_gather", "all_to_all", "all_ok", "everywhere", "calls"]

calls = {"n": 0}


def backend_device(backend: str | None = None) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device for nccl, the CPU otherwise."""
    if backend is None:
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _placed(t: torch.Tensor) -> torch.Tensor:
    dev = backend_device()
    return t if t.device == dev else t.to(dev, non_blocking=True)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduced copy of `t` on the backend's device (`t` itself when already there; reduced in place then)."""
    if not dist.is_initialized():
        return t
    out = _placed(t)
    calls["n"] += 1
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return out


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (same shape and dtype on all ranks), in rank order, on the backend's device."""
    if not dist.is_initialized():
        return [t]
    src = _placed(t).contiguous()
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size())]
    calls["n"] += 1
    dist.all_gather(parts, src)
    return parts


def all_to_all(t: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
    """Rows of `t` (dim 0) split by destination rank, `send_rows[r]` rows to rank r; returns the rows received,
    `recv_rows[r]` from rank r, concatenated in rank order, on the backend's device."""
    if not dist.is_initialized():
        return t
    src = _placed(t).contiguous()
    out = src.new_empty((sum(recv_rows), *src.shape[1:]))
    calls["n"] += 1
    dist.all_to_all_single(out, src, recv_rows, send_rows)
    return out


def all_ok(ok: bool) -> bool:
    """Whether every rank passed `ok` (a host decision, so this one syncs; used at checkpoint time only)."""
    return bool(all_reduce(torch.tensor([int(ok)], dtype=torch.int64), op="min").item())


def everywhere(what: str, fn):
    """fn() on every rank; if it raises on any rank, every rank raises, so none is left waiting in a later
    collective (e.g. one rank's storage error while the others go on into DeepSpeed's load)."""
    try:
        out, err = fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        out, err = None, e
    if not all_ok(err is None):
        where = f"this rank: {type(err).__name__}: {err}" if err is not None else "another rank"
        raise RuntimeError(f"{what} failed on {where}") from err
    return out
