"""Which config changes a resume may not make silently: the model, the loss and the data order must match the
checkpoint's saved config, or the resumed run is a different experiment with the same name.

Free to change on resume: the optimizer's LR and friends, engine details that DeepSpeed itself checks (ZeRO stage,
precision), compile and checkpointing, logging, sampling and checkpoint cadence.
"""
from __future__ import annotations

from typing import Any

from igscale.config.schema import MODEL_ARCH_FIELDS

__all__ = ["FROZEN", "frozen_changes"]

# section -> the fields that define the experiment (None: every field of the section)
FROZEN: dict[str, tuple[str, ...] | None] = {
    # the network itself; attn_backend only picks a kernel (a resume on other GPUs may need another one)
    "model": ("name", *(f for f in MODEL_ARCH_FIELDS if f != "attn_backend")),
    "loss": None,
    "data": ("manifest_url", "shuffle_buffer"),
    "train": ("seed", "global_batch"),
    "engine": ("grad_accum",),
}


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: d}


def frozen_changes(saved: dict, current: dict) -> list[str]:
    """Dotted names of frozen fields that differ, as "name: saved -> current" (both plain dicts from to_dict)."""
    out = []
    for section, fields in FROZEN.items():
        a, b = saved.get(section, {}), current.get(section, {})
        if section == "model" and isinstance(a.get("overrides"), dict):  # saved before the typed model fields
            a = {**a, **a["overrides"]}
        for f in fields if fields is not None else sorted(set(a) | set(b)):
            fa, fb = _flat(a.get(f), f"{section}.{f}"), _flat(b.get(f), f"{section}.{f}")
            for k in sorted(set(fa) | set(fb)):
                if fa.get(k) != fb.get(k):
                    out.append(f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}")
    return out
