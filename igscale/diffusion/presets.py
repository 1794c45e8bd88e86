"""Published settings behind the IG numbers: sampler and guidance (converted into igscale's time convention, t=1
noise) plus what must match them for the number to mean anything: the model, the checkpoint's codebase, the VAE,
the pixel quantisation and the label protocol.

Conversions from the official samplers' settings:
- SiT (already t=1 noise): SDE, 250 NFE on linspace(1, 0.04, 250) + deterministic step to 0; CFG for t ∈ [0, 0.7].
- LightningDiT (t=0 noise): heun2 over a 125-point grid (124 steps, 248 NFE) warped by shift 0.3 in their direction,
  which is shift 1/0.3 here; CFG off where their shifted t < 0.19, i.e. on for igscale t ≤ 0.81.
- Interval rule: the SiT sampler checks intervals at each step's start, LightningDiT's Heun at every evaluation
  (`GuidanceConfig.interval_at`); with SiT's one-evaluation SDE steps the two rules coincide.

Names are strings of igscale's other layers (a model registry name, a VAE kind of igscale.vae): this module may not
import models, and the commands check them where they are used. `PRESETS` is read live, so a preset added at run
time (a test's tiny one) is accepted everywhere a published one is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.samplers import SamplerConfig

__all__ = ["Preset", "PRESETS", "IDENTITY_FIELDS", "preset_names", "find_preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    sampler: SamplerConfig
    guidance: GuidanceConfig
    model: str
    """Model registry name, e.g. SiT-XL/2."""
    checkpoint_kind: Literal["sit", "lightningdit"]
    """Codebase of the official checkpoint (its key layout and time convention)."""
    vae: Literal["sd-vae", "va-vae-f16d32"]
    """VAE kind of igscale.vae the model's latents belong to."""
    quantization: Literal["sit", "vavae"]
    """Pixel quantisation of the codebase's decoder."""
    labels: Literal["random", "balanced"] = "random"
    """Label protocol of the published number."""
    description: str = ""
    expected_fid: float | None = None
    """The published FID-50K (ADM evaluator) of this setting."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields on top of the registry entry (empty for the published presets; tests build tiny ones)."""


# The preset fields a command flag of the same name may only repeat, never change.
IDENTITY_FIELDS = ("model", "checkpoint_kind", "vae", "quantization", "labels")

_SIT = dict(model="SiT-XL/2", checkpoint_kind="sit", vae="sd-vae", quantization="sit")
_LDIT = dict(model="LightningDiT-XL/1", checkpoint_kind="lightningdit", vae="va-vae-f16d32", quantization="vavae")

PRESETS: dict[str, Preset] = {
    "sit-xl2-ig-cfg-fid1.46": Preset(
        SamplerConfig(method="sde", num_steps=250, sde_t_last=0.04),
        GuidanceConfig(w_cfg=1.35, cfg_interval=(0.0, 0.7), w_ig=1.4, ig_interval=(0.0, 1.0), interval_at="step_start"),
        **_SIT, expected_fid=1.46,
        description="SiT-XL/2+IG, 800 ep, FID 1.46: SDE 250 NFE, CFG 1.35 on t<=0.7, IG 1.4 everywhere, SD-VAE ft-EMA",
    ),
    "lightningdit-xl1-ig-cfg-fid1.19": Preset(
        SamplerConfig(method="heun", num_steps=124, shift=1 / 0.3),
        GuidanceConfig(w_cfg=1.45, cfg_interval=(0.0, 0.81), w_ig=1.4, ig_interval=(0.0, 1.0), interval_at="eval_time"),
        **_LDIT, expected_fid=1.19,
        description="LightningDiT-XL/1+IG, 680 ep, FID 1.19: heun2 125 points (248 NFE), shift 0.3 (1/0.3 here), "
                    "CFG 1.45 for LightningDiT t>=0.19 (igscale t<=0.81), IG 1.4, VA-VAE f16d32",
    ),
    "lightningdit-xl1-ig-fid1.34": Preset(
        SamplerConfig(method="heun", num_steps=124, shift=1 / 0.3),
        GuidanceConfig(w_cfg=1.0, w_ig=1.7, interval_at="eval_time"),
        **_LDIT, expected_fid=1.34,
        description="LightningDiT-XL/1+IG, 680 ep, FID 1.34 without CFG: same grid, IG 1.7, VA-VAE f16d32",
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def find_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown sampler preset {name!r}; valid: {preset_names()}")
    return PRESETS[name]


def get_preset(name: str) -> tuple[SamplerConfig, GuidanceConfig]:
    p = find_preset(name)
    return p.sampler, p.guidance
