"""Sampler presets behind the published IG numbers, converted into igscale's time convention (t=1 noise).

Conversions from the official samplers' settings:
- SiT (already t=1 noise): SDE, 250 NFE on linspace(1, 0.04, 250) + deterministic step to 0; CFG for t ∈ [0, 0.7].
- LightningDiT (t=0 noise): heun2 over a 125-point grid (124 steps, 248 NFE) warped by shift 0.3 in their direction,
  which is shift 1/0.3 here; CFG off where their shifted t < 0.19, i.e. on for igscale t ≤ 0.81.
- Interval rule: the SiT sampler checks intervals at each step's start, LightningDiT's Heun at every evaluation
  (`GuidanceConfig.interval_at`); with SiT's one-evaluation SDE steps the two rules coincide.
"""
from __future__ import annotations

from dataclasses import dataclass

from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.samplers import SamplerConfig

__all__ = ["Preset", "PRESETS", "preset_names", "get_preset"]


@dataclass(frozen=True)
class Preset:
    sampler: SamplerConfig
    guidance: GuidanceConfig
    description: str
    model: str
    vae: str
    quantization: str
    labels: str = "random"


PRESETS: dict[str, Preset] = {
    "sit-xl2-ig-cfg-fid1.46": Preset(
        SamplerConfig(method="sde", num_steps=250, sde_t_last=0.04),
        GuidanceConfig(w_cfg=1.35, cfg_interval=(0.0, 0.7), w_ig=1.4, ig_interval=(0.0, 1.0), interval_at="step_start"),
        "SiT-XL/2+IG, 800 ep, FID 1.46 (gen.sh): SDE 250 NFE, CFG 1.35 on t<=0.7, IG 1.4 everywhere",
        model="SiT-XL/2", vae="sd-vae-ft-ema", quantization="sit",
    ),
    "lightningdit-xl1-ig-cfg-fid1.19": Preset(
        SamplerConfig(method="heun", num_steps=124, shift=1 / 0.3),
        GuidanceConfig(w_cfg=1.45, cfg_interval=(0.0, 0.81), w_ig=1.4, ig_interval=(0.0, 1.0), interval_at="eval_time"),
        "LightningDiT-XL/1+IG, 680 ep, FID 1.19: heun2 125 points (248 NFE), shift 0.3 (1/0.3 here), "
        "CFG 1.45 for LightningDiT t>=0.19 (igscale t<=0.81), IG 1.4",
        model="LightningDiT-XL/1", vae="va-vae-f16d32", quantization="vavae",
    ),
    "lightningdit-xl1-ig-fid1.34": Preset(
        SamplerConfig(method="heun", num_steps=124, shift=1 / 0.3),
        GuidanceConfig(w_cfg=1.0, w_ig=1.7, interval_at="eval_time"),
        "LightningDiT-XL/1+IG, 680 ep, FID 1.34 without CFG: same grid, IG 1.7",
        model="LightningDiT-XL/1", vae="va-vae-f16d32", quantization="vavae",
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> tuple[SamplerConfig, GuidanceConfig]:
    if name not in PRESETS:
        raise ValueError(f"unknown sampler preset {name!r}; valid: {preset_names()}")
    p = PRESETS[name]
    return p.sampler, p.guidance
