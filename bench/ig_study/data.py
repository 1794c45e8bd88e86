"""The study's data: scikit-learn's bundled 8×8 digits (no download), bilinearly upsampled to 16×16, in [-1, 1].

The images are used directly as the 1-channel "latent" (no VAE). A stratified held-out split is the FD reference and is
never seen by the diffusion models or the feature classifier.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
SIZE = 16


@dataclass
class DigitSplits:
    x_train: torch.Tensor  # (N_train, 1, 16, 16) float32 in [-1, 1]
    y_train: torch.Tensor  # (N_train,) long
    x_heldout: torch.Tensor  # (N_held, 1, 16, 16)
    y_heldout: torch.Tensor  # (N_held,)


def load_digits_16(heldout_fraction: float = 0.3, split_seed: int = 0) -> DigitSplits:
    """Stratified train / held-out split of the 1797 digits; the split depends only on split_seed."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no network

    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(split_seed)
    held = []
    for c in range(NUM_CLASSES):  # stratified: the same held-out fraction of every class
        idx = np.flatnonzero(d.target == c)
        held.extend(rng.permutation(idx)[: round(len(idx) * heldout_fraction)].tolist())
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    tr, he = torch.from_numpy(~mask), torch.from_numpy(mask)
    return DigitSplits(x[tr], y[tr], x[he], y[he])


def balanced_labels(n: int) -> torch.Tensor:
    """(n,) labels 0..9 cycling, so every class gets n/10 samples (row i has class i % 10)."""
    return torch.arange(n) % NUM_CLASSES
