"""The one seeding scheme of igscale: every random draw is a pure function of (run seed, stream, counters).

A stream is named by a `Stream` id; counters locate the draw inside it (rank, step, micro-batch for training noise;
sample index for sampling noise; epoch and shard key for the loader; image index for precompute). Nothing carries
generator state, so a resumed run draws exactly what an uninterrupted one would, and a sample's noise never depends on
which batch, rank or world size produced it.

The hash is a splitmix64 chain: h <- splitmix64(h ^ splitmix64(c + GOLDEN)) for each counter c. splitmix64 is a 64-bit
bijection, so for a fixed prefix distinct counters give distinct seeds, and nearby counters give unrelated ones.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

__all__ = ["Stream", "seed_of", "seeds_of", "generator", "numpy_rng", "splitmix64", "splitmix64_np"]

MASK64 = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


class Stream(IntEnum):
    """Stream ids. Values are part of the reproducibility contract: never renumber, only append."""

    TRAIN_NOISE = 1  # training x1 noise, counters (rank, step, micro)
    TRAIN_TIME = 2  # training t draws
    TRAIN_DROP = 3  # label-dropout mask
    TRAIN_GLOBAL = 4  # reseeds torch's global RNG per step (dropout inside library code)
    SAMPLE_NOISE = 5  # sampling: initial noise and SDE increments, counters (sample seed, sub-stream)
    SHARD_ORDER = 6  # loader: shard permutation per epoch, counters (epoch,)
    WINDOW_SHUFFLE = 7  # loader: in-window sample order, counters (epoch, rank, worker)
    POSTERIOR = 8  # loader: VAE posterior draw and flip per sample, counters (epoch, key)
    PRECOMPUTE = 9  # precompute: posterior draws of a flipped/unflipped image, counters (image index, view)


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser: a 64-bit bijection that spreads nearby inputs over the whole range."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * MIX1) & MASK64
    x = ((x ^ (x >> 27)) * MIX2) & MASK64
    return x ^ (x >> 31)


def splitmix64_np(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element of a uint64 array (numpy wraps uint64 arithmetic mod 2^64)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(MIX1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(MIX2)
    return x ^ (x >> np.uint64(31))


def _chain(h: int, c: int) -> int:
    return splitmix64(h ^ splitmix64((int(c) + GOLDEN) & MASK64))


def seed_of(seed: int, stream: Stream | int, *counters: int) -> int:
    """A 63-bit generator seed for the draw at `counters` of `stream` under the run's `seed` (63 bits: torch and
    numpy both take it as a non-negative int64)."""
    h = _chain(splitmix64(int(seed) & MASK64), int(stream))
    for c in counters:
        h = _chain(h, c)
    return h >> 1


def seeds_of(seed: int, stream: Stream | int, *counters: int, last: np.ndarray) -> np.ndarray:
    """`seed_of(seed, stream, *counters, k)` for every k of the int array `last`, vectorised (uint64 array)."""
    h = np.uint64(_chain(splitmix64(int(seed) & MASK64), int(stream)))
    for c in counters:
        h = np.uint64(_chain(int(h), c))
    with np.errstate(over="ignore"):
        mixed = splitmix64_np(np.asarray(last).astype(np.uint64) + np.uint64(GOLDEN))
    return splitmix64_np(mixed ^ h) >> np.uint64(1)


def generator(seed: int, stream: Stream | int, *counters: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed_of(seed, stream, *counters))


def numpy_rng(seed: int, stream: Stream | int, *counters: int) -> np.random.Generator:
    return np.random.default_rng(seed_of(seed, stream, *counters))
