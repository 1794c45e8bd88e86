"""Class labels for evaluation samples.

- "random": i.i.d. uniform labels, as the released SiT / LightningDiT generators draw them. Label i depends only
  on (base_seed + i), through its own random stream, so it is independent of world size, chunking and batching.
- "balanced": exactly N / num_classes samples of every class ("uniform balanced sampling"), in an order shuffled
  by a permutation seeded with base_seed. The whole list is cheap (N ints), so every rank builds it identically.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from igscale.diffusion.noise import per_sample_randint

__all__ = ["LABEL_STREAM", "make_labels"]

LABEL_STREAM = 1  # stream id of the label draw; stream 0 is the initial noise (igscale.diffusion.noise)


def make_labels(
    num_samples: int,
    num_classes: int,
    mode: Literal["random", "balanced"] = "random",
    base_seed: int = 0,
) -> np.ndarray:
    """(num_samples,) int64 labels for samples 0..N-1 under the given protocol."""
    if base_seed < 0:
        raise ValueError(f"base_seed must be >= 0, got {base_seed}")
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"num_samples and num_classes must be positive, got {num_samples}, {num_classes}")
    if mode == "random":
        # One tiny generator per sample (the diffusion noise scheme) keeps label i a function of its own seed only.
        seeds = range(base_seed, base_seed + num_samples)
        return per_sample_randint(seeds, num_classes, stream=LABEL_STREAM).numpy().astype(np.int64)
    if mode == "balanced":
        if num_samples % num_classes:
            raise ValueError(
                f"balanced labels need num_samples divisible by num_classes: {num_samples} % {num_classes} = "
                f"{num_samples % num_classes}; use e.g. N={num_samples - num_samples % num_classes or num_classes}"
            )
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), num_samples // num_classes)
        return labels[np.random.default_rng([int(base_seed), LABEL_STREAM]).permutation(num_samples)]
    raise ValueError(f"unknown label mode {mode!r}; expected 'random' or 'balanced'")
