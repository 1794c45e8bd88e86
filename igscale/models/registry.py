"""Named model variants ("SiT-XL/2", "LightningDiT-XL/1", ...) -> ModelConfig."""
from __future__ import annotations

import dataclasses
from typing import Any

from igscale.core.typed import from_dict
from igscale.models.config import ModelConfig
from igscale.models.dit import IGDiT

__all__ = ["MODEL_TABLE", "model_names", "model_config", "build_model", "build_model_from_config"]

# size -> (depth, hidden, heads)
_SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
_LDIT_SIZES = {
    "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "1p0B": (24, 1536, 24), "1p6B": (28, 1792, 28),
}


def _build_table() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for family in ("SiT", "DiT"):  # DiT and SiT share the backbone; igscale trains both with flow matching
        for size, (depth, d, heads) in _SIT_SIZES.items():
            for p in (1, 2, 4, 8):
                table[f"{family}-{size}/{p}"] = dict(
                    depth=depth, hidden_size=d, num_heads=heads, patch_size=p, input_size=32, in_channels=4,
                )
    for size, (depth, d, heads) in _LDIT_SIZES.items():
        for p in (1, 2):
            table[f"LightningDiT-{size}/{p}"] = dict(
                depth=depth, hidden_size=d, num_heads=heads, patch_size=p, input_size=16, in_channels=32,
                norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=False, ig_head_init="xavier",
            )
    return table


MODEL_TABLE = _build_table()


def model_names() -> list[str]:
    return sorted(MODEL_TABLE)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_TABLE:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(model_names())}")
    base = dict(MODEL_TABLE[name], name=name)
    base.update(overrides)
    return from_dict(ModelConfig, base)


def build_model(name: str, **overrides: Any) -> IGDiT:
    """Build a registry model, e.g. build_model("SiT-XL/2") or build_model("SiT-S/2", depth=4, ig_layers=(2,))."""
    return IGDiT(model_config(name, **overrides))


def build_model_from_config(cfg: ModelConfig | dict) -> IGDiT:
    if isinstance(cfg, dict):
        cfg = from_dict(ModelConfig, cfg)
    elif not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected ModelConfig or dict, got {type(cfg).__name__}")
    return IGDiT(dataclasses.replace(cfg))
