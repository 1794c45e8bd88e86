"""Guidance composed in the sampler: Internal Guidance (IG), classifier-free guidance (CFG), and both.

With I = D_i and F = D_f from one forward pass (conditional c, unconditional u):
    G_c = I_c + w_ig·(F_c − I_c),  G_u = I_u + w_ig·(F_u − I_u),  v = G_u + w_cfg·(G_c − G_u)
inside the CFG interval, v = G_c outside it (the official order: IG on both branches, then CFG). A scale of 1 switches a
guidance off. The unconditional branch is evaluated only where CFG is active (the official code always doubles the batch).
Intervals are closed [lo, hi] in igscale time (t=1 noise). Which time is checked is explicit (`interval_at`):
  eval_time   the time of each model evaluation (official LightningDiT: its Heun's second stage checks t_{n+1});
  step_start  the start time of the step, for every evaluation of that step (official SiT samplers).
The rules differ only for multi-stage steps (Heun) whose stages straddle an interval edge.
Where igscale is more general than the official code: a scale below 1 is applied (the official SiT sampler switches a
guidance on only for a scale above 1, so any scale <= 1 means off there); both intervals can be set for both families
(official LightningDiT has a CFG start only and a fixed IG interval); the unconditional rows are evaluated only where
CFG is active (official LightningDiT evaluates them at every step), which does not change the result.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["INTERVAL_RULES", "GuidanceConfig", "internal_guidance", "classifier_free_guidance", "GuidedVelocity"]


INTERVAL_RULES = ("eval_time", "step_start")


@dataclass
class GuidanceConfig:
    w_cfg: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    w_ig: float = 1.0
    ig_interval: tuple[float, float] = (0.0, 1.0)
    interval_at: Literal["eval_time", "step_start"] = "eval_time"
    """Which time the intervals are checked at: each evaluation's, or the step's start (see the module doc)."""

    def __post_init__(self):
        if not (math.isfinite(self.w_cfg) and math.isfinite(self.w_ig)):  # NaN would give black images, exit 0
            raise ValueError(f"guidance weights must be finite, got w_cfg={self.w_cfg}, w_ig={self.w_ig}")
        if self.interval_at not in INTERVAL_RULES:
            raise ValueError(f"interval_at must be one of {INTERVAL_RULES}, got {self.interval_at!r}")
        self.cfg_interval = tuple(float(v) for v in self.cfg_interval)
        self.ig_interval = tuple(float(v) for v in self.ig_interval)
        for name in ("cfg_interval", "ig_interval"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")

    def cfg_on(self, t: float) -> bool:
        return self.w_cfg != 1.0 and self.cfg_interval[0] <= t <= self.cfg_interval[1]

    def ig_on(self, t: float) -> bool:
        return self.w_ig != 1.0 and self.ig_interval[0] <= t <= self.ig_interval[1]


def internal_guidance(d_f: torch.Tensor, d_i: torch.Tensor, w_ig: float) -> torch.Tensor:
    """D_i + w_ig·(D_f − D_i): extrapolate from the weak intermediate prediction toward the final one.

    Written as D_f + (w_ig − 1)·(D_f − D_i), the same value, which is exactly D_f at w_ig = 1 in floating point.
    """
    return d_f + (w_ig - 1) * (d_f - d_i)


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, w_cfg: float) -> torch.Tensor:
    """uncond + w_cfg·(cond − uncond), written so that w_cfg = 1 returns cond exactly."""
    return cond + (w_cfg - 1) * (cond - uncond)


class GuidedVelocity:
    """v(x, t, t_step) for a whole batch at one time t of the step starting at t_step (default t), from a
    model_fn(x, t_vec, y) -> (D_f, D_i).

    Counts model rows evaluated (`rows`) and forward calls (`calls`) so benchmarks can report NFE cost.
    """

    def __init__(self, model_fn: Callable, y: torch.Tensor, guidance: GuidanceConfig, null_class: int):
        self.model_fn, self.y, self.g = model_fn, y, guidance
        self.y_null = torch.full_like(y, null_class)
        self.rows = 0
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: float, t_step: float | None = None) -> torch.Tensor:
        B = x.shape[0]
        t_rule = t_step if self.g.interval_at == "step_start" and t_step is not None else t
        cfg = self.g.cfg_on(t_rule)
        if cfg:
            xin, yin = torch.cat([x, x]), torch.cat([self.y, self.y_null])  # (2B, ...)
        else:
            xin, yin = x, self.y
        tin = torch.full((xin.shape[0],), float(t), dtype=x.dtype, device=x.device)
        d_f, d_i = self.model_fn(xin, tin, yin)[:2]
        self.rows += xin.shape[0]
        self.calls += 1
        out = internal_guidance(d_f, d_i, self.g.w_ig) if self.g.ig_on(t_rule) else d_f
        if cfg:
            cond, uncond = out[:B], out[B:]
            return classifier_free_guidance(cond, uncond, self.g.w_cfg)
        return out
