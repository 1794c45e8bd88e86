"""Typed settings of the IG study, with the 'full' (benchmark) and 'smoke' (test suite) presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from igscale.core.typed import from_dict


@dataclass
class ModelSettings:
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    ig_layer: int = 2
    """1-based block after which the IG head reads the tokens."""


@dataclass
class TrainSettings:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.99
    aux_weight: float = 0.5
    """Weight of the auxiliary loss in the 'with aux' arm; the other arm uses 0."""
    label_drop: float = 0.1
    eval_every: int = 200
    """Snapshot the EMA weights every this many steps for the FD-vs-steps curve."""


@dataclass
class ClassifierSettings:
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    feature_dim: int = 32


@dataclass
class SampleSettings:
    num_steps: int = 10
    """Euler steps (= NFE per sample) for every setting."""
    num_samples: int = 250
    """Samples per setting in the guidance sweep (balanced over classes)."""
    curve_samples: int = 200
    """Samples per checkpoint for the FD-vs-steps curve."""
    w_ig: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    w_cfg: tuple[float, ...] = (1.0, 1.1, 1.25, 1.5)
    """Small scales: FD is measured against the class mixture, and on these digits CFG above ~1.5 only hurts it."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    ig_interval: tuple[float, float] = (0.0, 1.0)
    confirm_seed_offset: int = 1_000_000
    """The best settings are re-measured on fresh noise seeds (offset) to remove selection bias."""


@dataclass
class StudyConfig:
    name: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    heldout_fraction: float = 0.3
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    workers: int = 2
    """Parallel worker processes for the training/sampling jobs; 1 runs everything in this process."""
    threads: int = 1
    """Torch threads per process. Tiny models scale badly across threads (and OpenMP spin-waits thrash on a shared
    CPU), so the default uses the cores as single-thread processes instead."""

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}")
        t, s = self.train, self.sample
        if t.steps < 1 or t.eval_every < 1 or t.steps % t.eval_every:
            raise ValueError(f"train.steps ({t.steps}) must be a positive multiple of train.eval_every ({t.eval_every})")
        if 1.0 not in s.w_ig or 1.0 not in s.w_cfg:
            raise ValueError("the sweep needs w_ig = 1 and w_cfg = 1 (the unguided baseline) in its grids")
        if s.num_samples < 20 or s.curve_samples < 20:
            raise ValueError("need at least 20 samples per setting for FD and precision/recall")
        if self.workers < 1 or self.threads < 1:
            raise ValueError("workers and threads must be >= 1")
        if not 1 <= self.model.ig_layer < self.model.depth:
            raise ValueError(f"model.ig_layer must lie in [1, depth-1], got {self.model.ig_layer}")


def _smoke() -> dict:
    return dict(
        name="smoke", seeds=[0], workers=1, threads=1,
        model=dict(hidden_size=32, depth=2, num_heads=2, ig_layer=1),
        train=dict(steps=20, batch_size=32, warmup_steps=5, eval_every=10, ema_decay=0.9),
        classifier=dict(epochs=2),
        sample=dict(num_steps=4, num_samples=60, curve_samples=40, w_ig=[1.0, 2.0], w_cfg=[1.0, 2.0]),
    )


PRESETS = {"full": dict, "smoke": _smoke}


def get_study_config(name: str = "full", overrides: dict | None = None) -> StudyConfig:
    """A preset, optionally updated by a nested dict of overrides (validated: unknown keys raise ConfigError)."""
    if name not in PRESETS:
        raise ValueError(f"unknown study preset {name!r}; valid: {sorted(PRESETS)}")
    base = dataclasses.asdict(from_dict(StudyConfig, PRESETS[name]()))
    for key, val in (overrides or {}).items():
        if isinstance(val, dict) and isinstance(base.get(key), dict):
            base[key].update(val)
        else:
            base[key] = val
    return from_dict(StudyConfig, base)
