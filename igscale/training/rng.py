"""Counter-based RNG streams: every random draw of a training step is a pure function of (seed, rank, step, micro).

A resumed run therefore draws the same noise, t and label-dropout mask as an uninterrupted one, with no generator
state to checkpoint. Streams are separated by a stream id so that e.g. noise and t never share bits.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["NOISE", "TIME", "DROP", "GLOBAL", "stream_seed", "stream_generator", "seed_global"]

NOISE, TIME, DROP, GLOBAL = 0, 1, 2, 3


def stream_seed(seed: int, rank: int, step: int, stream: int, micro: int = 0) -> int:
    """A 63-bit seed hashed (SeedSequence) from the counters; distinct tuples give independent streams."""
    words = np.random.SeedSequence([seed, rank, step, micro, stream, 0x16A1E]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1))


def stream_generator(seed: int, rank: int, step: int, stream: int, micro: int = 0) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(stream_seed(seed, rank, step, stream, micro))
    return g


def seed_global(seed: int, rank: int, step: int) -> None:
    """Reseed torch's global RNG per step, for any library code that draws from it (dropout, etc.)."""
    torch.manual_seed(stream_seed(seed, rank, step, GLOBAL))
