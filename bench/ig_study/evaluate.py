"""Sampling one setting with fixed per-sample noise and scoring it with igscale's metric code on classifier features."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.ig_study.classifier import DigitNet, embed
from bench.ig_study.data import NUM_CLASSES, SIZE, balanced_labels
from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.noise import per_sample_randn
from igscale.diffusion.samplers import SamplerConfig, sample
from igscale.eval.fid import GaussianStats, compute_stats, frechet_distance
from igscale.eval.metrics import precision_recall


@dataclass
class Reference:
    """Held-out split in classifier feature space: the target of every FD / precision / recall."""

    feats: np.ndarray  # (N_held, F) float64
    stats: GaussianStats


def make_reference(net: DigitNet, x_heldout: torch.Tensor) -> Reference:
    feats, _ = embed(net, x_heldout)
    return Reference(feats, compute_stats(feats))


def score(net: DigitNet, ref: Reference, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """FD (float64), precision/recall (k=3) against the held-out split, and class accuracy w.r.t. the labels y."""
    feats, pred = embed(net, x)
    s = compute_stats(feats)
    prec, rec = precision_recall(ref.feats, feats)
    return {
        "fd": frechet_distance(s.mu, s.sigma, ref.stats.mu, ref.stats.sigma),
        "precision": prec,
        "recall": rec,
        "accuracy": float(np.mean(pred == y.numpy())),
    }


def generate(
    model: torch.nn.Module, n: int, num_steps: int, guidance: GuidanceConfig, seed_base: int = 0
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """n samples (n, 1, 16, 16) with balanced labels; sample i uses noise seed seed_base + i in every setting."""
    seeds = list(range(seed_base, seed_base + n))
    noise = per_sample_randn(seeds, (1, SIZE, SIZE), stream=0)  # (n, 1, 16, 16)
    y = balanced_labels(n)
    x, stats = sample(
        model, noise, y, SamplerConfig(method="euler", num_steps=num_steps), guidance,
        null_class=NUM_CLASSES, seeds=seeds, return_stats=True,
    )
    return x, y, stats
