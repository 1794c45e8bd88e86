"""Training's random streams: every draw of a step is a pure function of (seed, rank, step, micro).

A resumed run therefore draws the same noise, t and label-dropout mask as an uninterrupted one, with no generator
state to checkpoint. The streams are `igscale.core.seeding` streams, so noise and t never share bits.
"""
from __future__ import annotations

import torch

from igscale.core.seeding import Stream, generator, seed_of

__all__ = ["NOISE", "TIME", "DROP", "GLOBAL", "stream_seed", "stream_generator", "seed_global"]

NOISE, TIME, DROP, GLOBAL = Stream.TRAIN_NOISE, Stream.TRAIN_TIME, Stream.TRAIN_DROP, Stream.TRAIN_GLOBAL


def stream_seed(seed: int, rank: int, step: int, stream: Stream, micro: int = 0) -> int:
    return seed_of(seed, stream, rank, step, micro)


def stream_generator(seed: int, rank: int, step: int, stream: Stream, micro: int = 0) -> torch.Generator:
    return generator(seed, stream, rank, step, micro)


def seed_global(seed: int, rank: int, step: int) -> None:
    """Reseed torch's global RNG per step, for any library code that draws from it (dropout, etc.)."""
    torch.manual_seed(stream_seed(seed, rank, step, GLOBAL))
