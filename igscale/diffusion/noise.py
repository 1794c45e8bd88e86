"""Per-sample random streams: a sample's noise depends only on (seed, stream), never on batch composition."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from igscale.core.seeding import Stream, generator

__all__ = ["generator_for", "per_sample_randn", "per_sample_randint", "PerSampleNoise"]


def generator_for(seed: int, stream: int = 0) -> torch.Generator:
    """The generator of sample `seed`'s sub-stream `stream` (0: initial noise, 1: label, 2+: SDE increments)."""
    return generator(seed, Stream.SAMPLE_NOISE, stream)


def per_sample_randn(
    seeds: Sequence[int], shape: tuple[int, ...], stream: int = 0, dtype=torch.float32, device="cpu"
) -> torch.Tensor:
    """(len(seeds), *shape) standard normal; row i is a function of (seeds[i], stream) only."""
    rows = [torch.randn(shape, generator=generator_for(s, stream)) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def per_sample_randint(seeds: Sequence[int], high: int, stream: int = 1, device="cpu") -> torch.Tensor:
    """(len(seeds),) integers in [0, high); row i depends on (seeds[i], stream) only."""
    vals = [int(torch.randint(high, (1,), generator=generator_for(s, stream))) for s in seeds]
    return torch.tensor(vals, dtype=torch.long, device=device)


class PerSampleNoise:
    """One generator per sample; each call draws the next (shape) normal for every sample (used for SDE steps)."""

    def __init__(self, seeds: Sequence[int], stream: int):
        self.gens = [generator_for(s, stream) for s in seeds]

    def randn(self, shape: tuple[int, ...], dtype=torch.float32, device="cpu") -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(device=device, dtype=dtype)
