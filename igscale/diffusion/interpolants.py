"""Interpolants (paths) between data and noise, in igscale's time convention.

Convention (the SiT one, used everywhere in igscale): t=1 is pure noise, t=0 is data,
    x_t = alpha(t)·x0 + sigma(t)·eps,        velocity v = alpha'(t)·x0 + sigma'(t)·eps.
Linear: alpha = 1-t, sigma = t, so v = eps - x0. Cosine (GVP): alpha = cos(pi t/2), sigma = sin(pi t/2).
The official LightningDiT code uses the opposite direction (t=0 noise, u = x0 - eps); convert with
t_igscale = 1 - t_ldit and v = -u (IGDiT does this for 'noise_at_0' weights).
"""
from __future__ import annotations

import math

import torch

__all__ = ["Interpolant", "LinearInterpolant", "CosineInterpolant", "INTERPOLANTS", "get_interpolant"]


def _bc(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) time over x (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


class Interpolant:
    name = "base"

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def d_alpha(self, t):
        raise NotImplementedError

    def d_sigma(self, t):
        raise NotImplementedError

    def x_t(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        t = _bc(t, x0)
        return self.alpha(t) * x0 + self.sigma(t) * eps

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        t = _bc(t, x0)
        return self.d_alpha(t) * x0 + self.d_sigma(t) * eps

    def _det(self, t):
        return self.alpha(t) * self.d_sigma(t) - self.sigma(t) * self.d_alpha(t)

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        t = _bc(t, x_t)
        return (self.d_sigma(t) * x_t - self.sigma(t) * v) / self._det(t)

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        t = _bc(t, x_t)
        return (self.alpha(t) * v - self.d_alpha(t) * x_t) / self._det(t)

    def score_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        """∇log p_t(x_t) = -E[eps|x_t]/sigma(t). Singular at t=0 (sigma=0)."""
        return -self.eps_from_v(x_t, v, t) / self.sigma(_bc(t, x_t))

    def v_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        t = _bc(t, x_t)
        x0 = (x_t - self.sigma(t) * eps) / self.alpha(t)
        return self.d_alpha(t) * x0 + self.d_sigma(t) * eps

    def v_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        t = _bc(t, x_t)
        eps = (x_t - self.alpha(t) * x0) / self.sigma(t)
        return self.d_alpha(t) * x0 + self.d_sigma(t) * eps

    def v_from_score(self, x_t: torch.Tensor, score: torch.Tensor, t) -> torch.Tensor:
        return self.v_from_eps(x_t, -score * self.sigma(_bc(t, x_t)), t)


class LinearInterpolant(Interpolant):
    name = "linear"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t) if torch.is_tensor(t) else -1.0

    def d_sigma(self, t):
        return torch.ones_like(t) if torch.is_tensor(t) else 1.0


class CosineInterpolant(Interpolant):
    """GVP path: alpha² + sigma² = 1."""

    name = "cosine"

    def alpha(self, t):
        return torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.sin(t * math.pi / 2)

    def d_alpha(self, t):
        return -math.pi / 2 * torch.sin(t * math.pi / 2)

    def d_sigma(self, t):
        return math.pi / 2 * torch.cos(t * math.pi / 2)


INTERPOLANTS = {"linear": LinearInterpolant, "cosine": CosineInterpolant}


def get_interpolant(name: str) -> Interpolant:
    if name not in INTERPOLANTS:
        raise ValueError(f"unknown path {name!r}; valid: {sorted(INTERPOLANTS)}")
    return INTERPOLANTS[name]()
