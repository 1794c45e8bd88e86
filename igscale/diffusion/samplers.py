"""Samplers over a denoiser callable: Euler / Heun ODE and Euler–Maruyama SDE, integrating from t=1 (noise) to t=0.

All guidance is composed by `GuidedVelocity`; the samplers only see v(x, t). The state is kept in float64 (as the
official SiT sampler) while the model runs in the noise dtype. SDE noise comes from per-sample generators, so a sample
depends only on its seed and the settings, never on the batch it was drawn in.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from igscale.diffusion.guidance import GuidanceConfig, GuidedVelocity
from igscale.diffusion.interpolants import get_interpolant
from igscale.diffusion.noise import PerSampleNoise
from igscale.diffusion.timesteps import shift_time

__all__ = ["SDE_STREAM", "SamplerConfig", "integrate", "sample"]

SDE_STREAM = 7  # per-sample stream id of the SDE increments (0 = initial noise, 1 = labels)


@dataclass
class SamplerConfig:
    method: Literal["euler", "heun", "sde"] = "euler"
    num_steps: int = 50
    """ODE: integration steps (Heun costs 2 NFE per step). SDE: NFE, as SiT's NUM_STEPS (num_steps-1 stochastic
    steps on linspace(1, sde_t_last), then one deterministic step to 0)."""
    shift: float = 1.0
    """Timestep shift s of t' = s·t/(1+(s-1)t); s > 1 spends more steps near noise (LightningDiT's 0.3 is s = 1/0.3)."""
    sde_t_last: float = 0.04
    heun_final_euler: bool = False
    """Heun: take an Euler step on the last interval (EDM style) instead of a full Heun step (LightningDiT heun2)."""
    path: Literal["linear", "cosine"] = "linear"
    state_dtype: Literal["float64", "float32"] = "float64"

    def __post_init__(self):
        if self.method not in ("euler", "heun", "sde"):
            raise ValueError(f"unknown sampler method {self.method!r}; valid: euler, heun, sde")
        if not isinstance(self.num_steps, int) or self.num_steps < (2 if self.method == "sde" else 1):
            raise ValueError(f"num_steps must be an integer >= {2 if self.method == 'sde' else 1}, got {self.num_steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if not 0.0 < self.sde_t_last < 1.0:
            raise ValueError(f"sde_t_last must lie in (0, 1), got {self.sde_t_last}")

    def time_grid(self) -> torch.Tensor:
        """Decreasing float64 grid from 1 to 0 (shift applied)."""
        if self.method == "sde":
            t = torch.cat([torch.linspace(1.0, self.sde_t_last, self.num_steps, dtype=torch.float64),
                           torch.zeros(1, dtype=torch.float64)])
        else:
            t = torch.linspace(1.0, 0.0, self.num_steps + 1, dtype=torch.float64)
        return shift_time(t, self.shift)

    def nfe(self) -> int:
        """Model evaluations per sample (a CFG step doubles the batch rows, not the NFE)."""
        if self.method == "heun":
            return 2 * self.num_steps - (1 if self.heun_final_euler else 0)
        return self.num_steps


@torch.no_grad()
def integrate(
    velocity: Callable[[torch.Tensor, float, float], torch.Tensor],
    x: torch.Tensor,
    sampler: SamplerConfig,
    *,
    seeds: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrate x from t=1 to t=0 under velocity(x, t, t_step), t_step being the start time of the step that
    evaluates at t (guidance intervals may be decided there). x (B, ...) in float; returns the same dtype.

    seeds: per-sample seeds for SDE increments (required for batch-independent SDE samples; without them the
    global torch RNG is used).
    """
    model_dtype = x.dtype
    state_dtype = torch.float64 if sampler.state_dtype == "float64" else torch.float32
    z = x.to(state_dtype)
    ts = sampler.time_grid().tolist()

    def v(z_: torch.Tensor, t: float, t_step: float) -> torch.Tensor:
        return velocity(z_.to(model_dtype), t, t_step).to(state_dtype)

    n = len(ts) - 1
    if sampler.method == "sde":
        interp = get_interpolant(sampler.path)
        noise = PerSampleNoise(seeds, SDE_STREAM) if seeds is not None else None
        for i in range(n):
            t_cur, t_next = ts[i], ts[i + 1]
            dt = t_next - t_cur  # < 0
            vel = v(z, t_cur, t_cur)
            # reverse SDE with diffusion g² = 2t (the official SiT choice): drift = v - ½ g² ∇log p_t
            g2 = 2.0 * t_cur
            drift = vel - 0.5 * g2 * interp.score_from_v(z, vel, t_cur)
            z = z + drift * dt
            if i < n - 1:  # the last step (to t=0) is deterministic
                xi = noise.randn(tuple(z.shape[1:]), dtype=state_dtype, device=z.device) if noise else torch.randn_like(z)
                z = z + (g2 * abs(dt)) ** 0.5 * xi
            if progress:
                progress(i)
    else:
        for i in range(n):
            t_cur, t_next = ts[i], ts[i + 1]
            dt = t_next - t_cur
            k1 = v(z, t_cur, t_cur)
            if sampler.method == "euler" or (sampler.heun_final_euler and i == n - 1):
                z = z + dt * k1
            else:
                k2 = v(z + dt * k1, t_next, t_cur)
                z = z + 0.5 * dt * (k1 + k2)
            if progress:
                progress(i)
    return z.to(model_dtype)


def sample(
    model: Callable,
    noise: torch.Tensor,
    y: torch.Tensor,
    sampler: SamplerConfig,
    guidance: GuidanceConfig | None = None,
    *,
    null_class: int,
    seeds: Sequence[int] | None = None,
    return_stats: bool = False,
    progress: Callable[[int], None] | None = None,
):
    """Guided sampling from noise (B, C, H, W) at t=1 to latents at t=0.

    model(x, t, y) -> (D_f, D_i). An nn.Module is switched to eval mode for the call (train-mode label dropout would
    null random conditional rows) and restored afterwards.
    """
    guidance = guidance or GuidanceConfig()
    if seeds is not None and len(seeds) != noise.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {noise.shape[0]}")
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        gv = GuidedVelocity(model, y, guidance, null_class)
        out = integrate(gv, noise, sampler, seeds=seeds, progress=progress)
    finally:
        if was_training:
            model.train()
    if return_stats:
        B = noise.shape[0]
        return out, {"calls": gv.calls, "rows_per_sample": gv.rows / B, "nfe": sampler.nfe()}
    return out
