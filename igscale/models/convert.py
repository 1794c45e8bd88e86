"""Load the official SiT+IG and LightningDiT+IG checkpoints into IGDiT, and export inference weights.

Official checkpoint layouts:
- SiT: `{"model", "ema", "opt", "args", ...}`; IG head under `final_layer_xr.*`; t=1 is noise (igscale's convention).
- LightningDiT: `{"model", "ema", "opt", "config"}`, `model` keys may carry one or more `module.` prefixes (double DDP
  wrapping); RoPE tables stored as `feat_rope.freqs_cos/freqs_sin` buffers; t=0 is noise, so the model is built with
  time_convention="noise_at_0" and IGDiT converts at its boundary. The IG head is xavier-initialised there.
Checkpoints are read with torch.load(weights_only=True): no pickled code runs.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from igscale.core.typed import to_dict
from igscale.models.dit import IGDiT
from igscale.models.registry import build_model_from_config, model_config

__all__ = ["KINDS", "CheckpointMismatchError", "select_weights", "convert_official_state_dict",
           "load_state_dict_strict", "load_official_checkpoint", "EXPORT_WEIGHTS", "EXPORT_CONFIG",
           "save_inference_export", "load_inference_export"]

KINDS = ("sit", "lightningdit")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
# Official key prefix -> igscale key prefix
_RENAMES = {"final_layer_xr.": "ig_heads.0."}
# Keys that hold recomputable tables, not weights
_DROP_PREFIXES = ("feat_rope.",)


class CheckpointMismatchError(ValueError):
    pass


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def select_weights(ckpt: dict[str, Any], which: str = "ema") -> dict[str, torch.Tensor]:
    """Pick the weight dict from an official checkpoint: `ema` (default), else `model`, else a raw state dict."""
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"checkpoint is a {type(ckpt).__name__}, expected a dict")
    if which in ckpt and isinstance(ckpt[which], dict):
        return ckpt[which]
    if which == "ema" and "model" in ckpt and isinstance(ckpt["model"], dict):
        return ckpt["model"]
    if all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt
    raise CheckpointMismatchError(f"no {which!r} or 'model' weights in checkpoint; top-level keys: {sorted(ckpt)[:20]}")


def convert_official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key layout (SiT or LightningDiT) -> IGDiT key layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = _strip(key)
        if k.startswith(_DROP_PREFIXES):
            continue
        for old, new in _RENAMES.items():
            if k.startswith(old):
                k = new + k[len(old):]
        if k in out:
            raise CheckpointMismatchError(f"two checkpoint keys map to {k!r} (duplicate prefixes?)")
        out[k] = value
    return out


def load_state_dict_strict(model: IGDiT, sd: dict[str, torch.Tensor]) -> None:
    """Strict load with one clear error listing every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [f"checkpoint does not match {model.config.name}:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}): {shapes}")
        raise CheckpointMismatchError("\n".join(parts))
    model.load_state_dict(sd, strict=True)


def load_official_checkpoint(
    path: str, model_name: str, kind: str, *, which: str = "ema", **overrides: Any
) -> IGDiT:
    """Build `model_name` (e.g. "SiT-XL/2", "LightningDiT-XL/1") and load an official IG checkpoint into it.

    kind: "sit" or "lightningdit" (sets the time convention and IG-head init of the official code).
    overrides: ModelConfig fields, e.g. ig_layers=(8,) if the checkpoint used another encoder_depth.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; valid: {list(KINDS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if kind == "lightningdit":
        overrides = {"time_convention": "noise_at_0", "ig_head_init": "xavier", **overrides}
    cfg = model_config(model_name, **overrides)
    # The official SiT trainer stores its argparse Namespace under "args": allow exactly that class, nothing else.
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = convert_official_state_dict(select_weights(ckpt, which))
    model = build_model_from_config(cfg)
    load_state_dict_strict(model, sd)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Inference export: weights in safetensors + the model config as JSON (local folders; see igscale.eval for URLs).

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "model_config.json"


def save_inference_export(model: IGDiT, folder: str, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(folder, EXPORT_WEIGHTS), metadata={"format": "igscale-export-v1"})
    with open(os.path.join(folder, EXPORT_CONFIG), "w") as f:
        json.dump({"model": to_dict(model.config), **(extra or {})}, f, indent=2)


def load_inference_export(folder: str) -> IGDiT:
    from safetensors.torch import load_file

    wpath, cpath = os.path.join(folder, EXPORT_WEIGHTS), os.path.join(folder, EXPORT_CONFIG)
    for p in (wpath, cpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"inference export is missing {p} (expected {EXPORT_WEIGHTS} + {EXPORT_CONFIG})")
    with open(cpath) as f:
        meta = json.load(f)
    model = build_model_from_config(meta["model"])
    load_state_dict_strict(model, load_file(wpath))
    return model.eval()
