"""What one checkpoint tag holds, and the only code that knows its file names.

    <tag>/<DeepSpeed's files>        weights, optimizer and ZeRO partitions (written by the engine's save)
    <tag>/trainer_rank{r:05d}.pt     every rank: step counters, loader position, torch RNG state
    <tag>/ema_rank{r:05d}.pt         the EMA: one full copy (rank 0), or each rank's flat slice when the
                                     parameter views are sharded (ZeRO-3, or ZeRO-1/2 with fp32 master views)
    <tag>/optim_rank{r:05d}.pt       every rank's optimizer shard, for optimizers that shard themselves (ZeRO-1 Muon)
    <tag>/config.json                the resolved run config (rank 0)
    <tag>/model_config.json          the model's own config, enough to rebuild it for export (rank 0)

The trainer hands `write_rank_files` plain state dicts; resume and export read these files through the functions
below, all with `torch.load(weights_only=True)` onto the CPU (a file saved by GPU 5 loads on a node with 4), so a
planted pickle in them never runs. DeepSpeed's own files, and their universal form (igscale.checkpoint.universal),
are unpickled by DeepSpeed: docs/security.md.
"""
from __future__ import annotations

import json
import os

import torch

from igscale.checkpoint.store import Checkpointer
from igscale.distributed.engine import assemble_flat

__all__ = ["write_rank_files", "read_trainer", "read_ema", "read_config", "read_export_inputs", "consolidate_ema",
           "reshard_ema", "read_optim_shards", "SMALL_PREFIXES"]

SMALL_PREFIXES = ("trainer_rank", "ema_rank", "optim_rank")  # igscale's own per-rank files

CONFIG, MODEL_CONFIG = "config.json", "model_config.json"


def _trainer(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


def _ema(rank: int) -> str:
    return f"ema_rank{rank:05d}.pt"


def _optim(rank: int) -> str:
    return f"optim_rank{rank:05d}.pt"


def write_rank_files(d: str, rank: int, *, trainer: dict, ema: dict | None = None, ema_layout: dict | None = None,
                     ema_sharded: bool = False, world_size: int = 1, config: dict | None = None,
                     model_config: dict | None = None, optim: dict | None = None) -> None:
    """This rank's files into the tag folder `d`. `ema`: the EMA state dict if this rank owns (part of) it;
    `ema_layout`: name -> (start, full shape, full numel) of this rank's slices; config/model_config on rank 0."""
    os.makedirs(d, exist_ok=True)
    torch.save(trainer, os.path.join(d, _trainer(rank)))
    if optim is not None:
        torch.save(optim, os.path.join(d, _optim(rank)))
    if ema is not None:
        torch.save({"ema": ema, "layout": ema_layout, "sharded": ema_sharded, "world_size": world_size},
                   os.path.join(d, _ema(rank)))
    for name, obj in ((CONFIG, config), (MODEL_CONFIG, model_config)):
        if obj is not None:
            with open(os.path.join(d, name), "w") as f:
                json.dump(obj, f, indent=1)


def read_trainer(d: str, rank: int) -> dict:
    return torch.load(os.path.join(d, _trainer(rank)), map_location="cpu", weights_only=True)


def read_ema(d: str, rank: int, sharded: bool) -> dict:
    """The EMA state dict this rank resumes from: its own slice when sharded, else rank 0's full copy."""
    return torch.load(os.path.join(d, _ema(rank if sharded else 0)), map_location="cpu", weights_only=True)["ema"]


def read_optim_shards(d: str) -> list[dict]:
    """Every rank's optimizer shard in the tag folder `d` (empty when the optimizer did not shard itself)."""
    names = sorted(n for n in os.listdir(d) if n.startswith("optim_rank") and n.endswith(".pt"))
    return [torch.load(os.path.join(d, n), map_location="cpu", weights_only=True) for n in names]


def read_config(d: str) -> dict | None:
    """The run config saved with the tag (None for checkpoints written before configs were saved)."""
    path = os.path.join(d, CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def consolidate_ema(d: str) -> dict[str, torch.Tensor]:
    """Full fp32 EMA tensors by name from the tag folder's EMA files (one full copy or one slice per rank)."""
    files = sorted(n for n in os.listdir(d) if n.startswith("ema_rank") and n.endswith(".pt"))
    if not files:
        raise ValueError(f"{d}: no EMA files in the checkpoint")
    parts = [torch.load(os.path.join(d, f), map_location="cpu", weights_only=True) for f in files]
    first = parts[0]
    if first["sharded"] and len(parts) != first["world_size"]:
        raise ValueError(f"sharded EMA needs {first['world_size']} rank files, found {len(parts)}")
    return {name: assemble_flat([(p["layout"][name][0], p["ema"]["shadow"][name]) for p in parts], shape, numel)
            for name, (_, shape, numel) in first["layout"].items()}


def reshard_ema(full: dict[str, torch.Tensor], views: list[tuple[str, torch.Tensor]],
                view_layout: dict[str, tuple[int, list[int], int]]) -> dict:
    """An EMA state dict for this rank's views (any world size, ZeRO stage) from the consolidated EMA: each view
    is the slice at its start of the flattened tensor, zeros past its end (ZeRO-3's padding)."""
    shadow = {}
    for name, view in views:
        if name not in full:
            raise ValueError(f"the checkpoint's EMA has no tensor {name!r}")
        start, shape, numel = view_layout[name]
        if list(full[name].shape) != list(shape):
            raise ValueError(f"EMA {name}: checkpoint shape {tuple(full[name].shape)} != {tuple(shape)}")
        flat = full[name].flatten().float()
        out = torch.zeros(view.numel(), dtype=torch.float32)
        n = max(0, min(view.numel(), numel - start))
        out[:n] = flat[start:start + n]
        shadow[name] = out.view(view.shape)
    return {"shadow": shadow}


def read_export_inputs(ck: Checkpointer, tag: str, dest: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config, consolidated EMA) of `tag`, downloading only those files (no optimizer state) into dest."""
    local = ck.download(tag, dest, only=lambda rel: rel.startswith("ema_rank") or rel == MODEL_CONFIG)
    d = os.path.join(local, tag)
    with open(os.path.join(d, MODEL_CONFIG)) as f:
        model_config = json.load(f)
    return model_config, consolidate_ema(d)
