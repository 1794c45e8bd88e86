"""Training-time t sampling and the timestep shift, in igscale's convention (t=1 noise)."""
from __future__ import annotations

import torch

__all__ = ["T_KINDS", "shift_time", "sample_t"]

T_KINDS = ("uniform", "logit_normal")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style shift t' = s·t / (1 + (s-1)·t). s > 1 moves time toward the noise end (t=1).

    LightningDiT's `timestep_shift` s_L works in the opposite direction (t=0 noise); it equals s = 1/s_L here.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_t(
    n: int,
    *,
    kind: str = "uniform",
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n,) training times in [0, 1]: uniform, or logit-normal(mean, std) (= SiT's 'lognormal' on the linear path)."""
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown t sampling {kind!r}; valid: {list(T_KINDS)}")
    return shift_time(t, shift)
