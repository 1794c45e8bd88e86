"""Typed configs of `igscale sample`, `igscale sweep`, `igscale eval`, `igscale tune` and `igscale reproduce`.

Each command's flags, defaults and help text are generated from these dataclasses (igscale.core.cli_args), and each
section checks its values in `__post_init__`, so a bad flag fails in one line before any process group starts.
The sections are plain dataclasses mixed into the command configs; igscale.eval.setup reads them by attribute.

A `--preset` fixes more than the sampler: the model, checkpoint kind, VAE, pixel quantisation and label protocol it
was published with (`apply_preset`). Those "identity" flags default to none, meaning the preset's value (or the
plain default without a preset), so a flag that contradicts the preset is seen and refused instead of producing a
plausible wrong FID.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from igscale.diffusion.presets import IDENTITY_FIELDS, PRESETS, find_preset, preset_names
from igscale.eval.generate import GenerationConfig

__all__ = ["ModelSource", "DecoderArgs", "SamplerArgs", "GuidanceArgs", "GridArgs", "SampleConfig", "SweepConfig",
           "EvalConfig", "TuneConfig", "ReproduceConfig", "apply_preset", "show_presets"]

Interval = tuple[float, float]
# Unset identity fields without a preset: latents are stored undecoded, labels drawn at random.
_PLAIN_DEFAULTS = {"vae": "none", "labels": "random"}


def _check_interval(flag: str, v) -> None:
    if v is not None and not 0.0 <= v[0] <= v[1] <= 1.0:
        raise ValueError(f"{flag} must satisfy 0 <= LO <= HI <= 1, got {v[0]:g} {v[1]:g}")


def _check_weight(flag: str, v) -> None:
    if v is not None and not math.isfinite(v):  # NaN guidance gives black images with exit code 0
        raise ValueError(f"{flag} must be finite, got {v}")


@dataclass(kw_only=True)
class ModelSource:
    """model (one of --export or --checkpoint)"""

    export: str | None = None
    """igscale inference export: folder or s3:// prefix (model.safetensors + model_config.json)."""
    checkpoint: str | None = None
    """Official IG checkpoint (.pt); needs --model and --checkpoint-kind, or a --preset that sets them."""
    model: str | None = None
    """Registry name of the --checkpoint model, e.g. SiT-XL/2; default: the preset's."""
    checkpoint_kind: Literal["sit", "lightningdit"] | None = None
    """Official codebase of --checkpoint; default: the preset's."""


@dataclass(kw_only=True)
class DecoderArgs:
    """decoder"""

    vae: Literal["sd-vae", "va-vae-f16d32", "none"] | None = None
    """VAE of igscale.vae (diffusers AutoencoderKL); default (also for an explicit none): the preset's VAE, and
    without a preset none, which stores quantised latents (latent-space runs, not ADM-evaluable)."""
    vae_weights: str | None = None
    """Local path / s3:// URL of the VAE weights (diffusers folder or LDM file)."""
    quantization: Literal["sit", "vavae"] | None = None
    """Pixel quantisation (sit: 255*(x+1)/2, vavae: 127.5x+128, both truncated); default: the preset's, else sit for
    sd-vae and vavae for va-vae-f16d32."""
    latent_scale: float = 0.18215
    """SD-VAE: model latent = z * scale (SiT recipe)."""
    latent_stats: str | None = None
    """VA-VAE: per-channel latent mean/std the model was trained with: a dataset manifest.json (latent_stats) or
    latents_stats.pt (mean, std); path or s3://."""

    def __post_init__(self):
        if not self.latent_scale > 0:
            raise ValueError(f"--latent-scale must be > 0, got {self.latent_scale}")


@dataclass(kw_only=True)
class SamplerArgs:
    """sampler (a preset, then explicit overrides; unset flags keep the preset's value)"""

    preset: str | None = None
    """Published settings (igscale.diffusion.presets): sampler and guidance, and the model, checkpoint kind, VAE,
    quantisation and labels they hold for; default: igscale's sampler defaults."""
    method: Literal["euler", "heun", "sde"] | None = None
    """Euler or Heun ODE, or the Euler-Maruyama SDE (SiT's sampler)."""
    num_steps: int | None = None
    """ODE steps (Heun costs 2 NFE per step); SDE: NFE."""
    shift: float | None = None
    """Timestep shift s > 0 (s > 1 spends more steps near noise)."""
    interval_at: Literal["eval_time", "step_start"] | None = None
    """Time at which the guidance intervals are checked: each model evaluation's, or the step's start for all its
    evaluations. Unset: the preset's rule; without a preset, the model family's official one (SiT/DiT step_start,
    LightningDiT eval_time)."""

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:  # the live dict: tests add presets at run time
            raise ValueError(f"--preset: {self.preset!r} is not one of {', '.join(preset_names())}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"--num-steps must be >= 1, got {self.num_steps}")
        if self.shift is not None and not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"--shift must be > 0, got {self.shift}")


@dataclass(kw_only=True)
class GuidanceArgs:
    """guidance (unset flags keep the preset's value)"""

    w_cfg: float | None = None
    """Classifier-free guidance weight (1: off)."""
    cfg_interval: Interval | None = None
    """t range (t=1 noise) where CFG is applied: LO HI or LO,HI."""
    w_ig: float | None = None
    """Internal Guidance weight (1: off)."""
    ig_interval: Interval | None = None
    """t range (t=1 noise) where IG is applied: LO HI or LO,HI."""

    def __post_init__(self):
        _check_weight("--w-cfg", self.w_cfg)
        _check_weight("--w-ig", self.w_ig)
        _check_interval("--cfg-interval", self.cfg_interval)
        _check_interval("--ig-interval", self.ig_interval)


@dataclass(kw_only=True)
class GridArgs:
    """grid (each axis defaults to the preset's value)"""

    w_ig: list[float] = field(default_factory=list)
    """IG weights to sweep (default: the preset's)."""
    w_cfg: list[float] = field(default_factory=list)
    """CFG weights to sweep (default: the preset's)."""
    cfg_interval: list[Interval] = field(default_factory=list)
    """CFG intervals LO,HI to sweep (default: the preset's); dropped where w_cfg is 1."""
    ig_interval: list[Interval] = field(default_factory=list)
    """IG intervals LO,HI to sweep (default: the preset's); dropped where w_ig is 1."""

    def __post_init__(self):
        for v in self.w_ig + self.w_cfg:
            _check_weight("--w-ig/--w-cfg", v)
        for v in self.cfg_interval:
            _check_interval("--cfg-interval", v)
        for v in self.ig_interval:
            _check_interval("--ig-interval", v)


@dataclass(kw_only=True)
class PresetLabels:
    """job"""

    labels: Literal["random", "balanced"] | None = None
    """Class labels: random (seeded per sample) or balanced (num_samples / num_classes of every class); default: the
    preset's protocol, random without a preset."""


def apply_preset(cfg) -> None:
    """Fill the identity fields of `cfg` that are unset (None) from its preset, or with the plain defaults without
    one; refuse an explicit value that contradicts the preset, naming both. Fields `cfg` lacks are skipped."""
    p = find_preset(cfg.preset) if cfg.preset else None
    for name in IDENTITY_FIELDS:
        if not hasattr(cfg, name):
            continue
        have = getattr(cfg, name)
        want = getattr(p, name) if p else _PLAIN_DEFAULTS.get(name)
        if have is None:
            setattr(cfg, name, want)
        elif p and have != want:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {have} contradicts --preset {cfg.preset}, whose {name.replace('_', ' ')} is "
                             f"{want}; drop {flag} (it defaults to the preset's) or choose another preset")


def _check_decoder(cfg) -> None:
    """The decoder's inputs, once the preset has chosen the VAE (before any weights are read)."""
    if cfg.vae != "none" and not cfg.vae_weights:
        raise ValueError(f"--vae {cfg.vae} needs --vae-weights (a diffusers folder or LDM checkpoint; igscale never "
                         "downloads weights)")
    if cfg.vae == "va-vae-f16d32" and not cfg.latent_stats:
        raise ValueError("--vae va-vae-f16d32 needs --latent-stats (the per-channel mean/std used in training, e.g. "
                         "latents_stats.pt)")


def show_presets(parser):
    """List the presets registered now as --preset's choices in the help (a Literal would freeze them at import)."""
    for action in parser._actions:
        if action.dest == "preset":
            action.display = "{" + ",".join(preset_names()) + "}"
    return parser


def _check_sections(obj) -> None:
    """Run the `__post_init__` of every section a command config is made of (dataclass calls only the first), then
    resolve its preset."""
    for klass in type(obj).__mro__[1:]:
        if "__post_init__" in vars(klass) and not issubclass(klass, _Job):  # sections only, not parent commands
            vars(klass)["__post_init__"](obj)
    apply_preset(obj)
    if hasattr(obj, "vae_weights"):
        _check_decoder(obj)


class _Job:
    def generation(self) -> GenerationConfig:
        """The GenerationConfig part (what igscale.eval.generate records as the job's identity)."""
        vals = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationConfig)}
        return GenerationConfig(**{**vals, "labels": vals["labels"] or "random"})


@dataclass(kw_only=True)
class SampleConfig(ModelSource, DecoderArgs, SamplerArgs, GuidanceArgs, PresetLabels, GenerationConfig, _Job):
    out: str
    """Output folder or s3:// prefix (chunks/, samples.npz, samples.json)."""

    def __post_init__(self):
        _check_sections(self)


@dataclass(kw_only=True)
class SweepConfig(ModelSource, DecoderArgs, SamplerArgs, GridArgs, PresetLabels, GenerationConfig, _Job):
    out: str
    """Folder or s3:// prefix; one sub-folder per grid point + the report."""
    ref: str | None = None
    """ADM reference batch npz (path or s3://); required unless --no-score."""
    inception: str | None = None
    """Path, folder or s3:// URL of pt_inception-2015-12-05-6726825d.pth; required unless --no-score."""
    score: bool = True
    """Score every point with Inception against --ref; --no-score only samples the grid (one samples.npz per
    point, shared seeds), for scoring with another evaluator or feature network."""
    num_samples: int = 10_000
    eval_batch_size: int = 64
    """Images per Inception forward, per rank."""
    allow_unverified_weights: bool = False
    """Score with an Inception file whose sha256 is not the published one (tests, the demo); metrics.json records
    it as unverified."""

    def __post_init__(self):
        _check_sections(self)
        if self.eval_batch_size < 1:
            raise ValueError(f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        if self.score and not (self.ref and self.inception):
            raise ValueError("--ref and --inception are required to score the grid (or pass --no-score to only "
                             "sample it)")


@dataclass(kw_only=True)
class EvalConfig:
    ref: str | None = None
    """ADM reference batch npz: arr_0 images, with or without mu, sigma, mu_s, sigma_s (computed from arr_0 when
    absent, as the ADM evaluator does); path or s3://."""
    sample: str | None = None
    """Sample batch npz (arr_0 uint8 NHWC); path or s3://."""
    inception: str
    """Path, folder or s3:// URL of pt_inception-2015-12-05-6726825d.pth."""
    batch_size: int = 64
    """Images per Inception forward, per rank."""
    out: str | None = None
    """Write the metrics JSON here (path or s3://)."""
    make_ref: str | None = None
    """Instead of scoring: build a reference batch at this path from --images."""
    images: str | None = None
    """npz of real images (arr_0 uint8 NHWC) for --make-ref."""
    num_pr_images: int = 10_000
    """--make-ref: images kept in the reference batch for precision/recall."""
    pr_distance_dtype: Literal["float32", "float16"] = "float32"
    """Precision/recall distances in float32, or in float16 as the ADM evaluator computes them (closer to published
    P/R columns; reads slightly higher, docs/evaluation.md)."""
    allow_unverified_weights: bool = False
    """Score with an Inception file whose sha256 is not the published one (tests, the demo); metrics.json records
    it as unverified."""

    def __post_init__(self):
        if self.batch_size < 1 or self.num_pr_images < 1:
            raise ValueError(f"--batch-size and --num-pr-images must be >= 1, got {self.batch_size}, "
                             f"{self.num_pr_images}")
        if not self.make_ref and not (self.ref and self.sample):
            raise ValueError("give REF and SAMPLE, or --make-ref OUT --images NPZ")
        if self.make_ref and not self.images:
            raise ValueError("--make-ref needs --images")


@dataclass(kw_only=True)
class ReproduceConfig(DecoderArgs, PresetLabels, GenerationConfig, _Job):
    """`igscale reproduce`: a published number from released weights; the preset fixes every setting it depends on."""

    preset: str
    """Published setting to reproduce (igscale.diffusion.presets): sampler, guidance, model, checkpoint kind, VAE,
    quantisation and label protocol."""
    checkpoint: str
    """Official IG checkpoint (.pt in the released model/ema/opt layout; its ema weights are loaded), path or s3://."""
    model: str | None = None
    """Registry name of the checkpoint's model; default: the preset's (another value is refused)."""
    checkpoint_kind: Literal["sit", "lightningdit"] | None = None
    """Official codebase of the checkpoint; default: the preset's (another value is refused)."""
    ref: str
    """ADM reference batch npz, e.g. VIRTUAL_imagenet256_labeled.npz (path or s3://)."""
    inception: str
    """Path, folder or s3:// URL of pt_inception-2015-12-05-6726825d.pth."""
    out: str
    """Output folder or s3:// prefix: chunks/, samples.npz, samples.json, metrics.json."""
    eval_batch_size: int = 64
    """Images per Inception forward, per rank."""
    allow_unverified_weights: bool = False
    """Score with an Inception file whose sha256 is not the published one (tests, the demo); metrics.json records
    it as unverified."""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset: {self.preset!r} is not one of {', '.join(preset_names())}")
        _check_sections(self)
        if self.eval_batch_size < 1:
            raise ValueError(f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")


@dataclass(kw_only=True)
class TuneConfig(SweepConfig):
    """`igscale tune`: the sweep's grid, searched by successive halving instead of scored in full."""

    start_samples: int = 1000
    """Samples per candidate at the first rung (each rung doubles it, up to --num-samples)."""
    keep: float = 0.5
    """Fraction of candidates kept at each rung (rounded up, at least one)."""

    def __post_init__(self):
        SweepConfig.__post_init__(self)
        if not self.score:
            raise ValueError("igscale tune ranks candidates by FID, so it cannot run with --no-score")
        if not 1 <= self.start_samples <= self.num_samples:
            raise ValueError(f"--start-samples must lie in [1, --num-samples], got {self.start_samples}")
        if not 0.0 < self.keep < 1.0:
            raise ValueError(f"--keep must lie in (0, 1), got {self.keep}")
        if self.labels != "random":  # balanced label lists depend on the count, so a rung could not extend the last
            raise ValueError("igscale tune needs --labels random (balanced labels change with the sample count)")

