"""Flow-matching loss with the Internal Guidance auxiliary term.

loss_i = mean_CHW (D_f - v)² + aux_weight · mean_heads mean_CHW (D_i - v)²  [+ cosine term on D_f, LightningDiT option]
The model is any callable model_fn(x_t, t, y[, drop_mask=...]) -> (D_f, D_i or [D_i, ...]);
this module never imports a model.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from igscale.diffusion.interpolants import get_interpolant

__all__ = ["channel_cosine_loss", "ig_loss"]


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def channel_cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over H, W of 1 - cos_sim over the channel dim (LightningDiT's `use_cosine_loss`)."""
    return _mean_flat(1 - F.cosine_similarity(pred.float(), target.float(), dim=1))


def ig_loss(
    model_fn: Callable,
    x0: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    path: str = "linear",
    aux_weight: float = 0.5,
    cosine_loss: bool = False,
    drop_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample loss terms, each (B,): 'loss' (the total to average), 'main', 'aux', 'cos'.

    x0 (B, C, H, W) clean latents, t (B,) in [0, 1] with noise at 1, noise (B, C, H, W).
    cosine_loss=True adds the channel-cosine term on D_f with weight 1 (LightningDiT's `use_cosine_loss`).
    """
    interp = get_interpolant(path)
    x_t = interp.x_t(x0, noise, t)
    target = interp.velocity(x0, noise, t)
    out = model_fn(x_t, t, y) if drop_mask is None else model_fn(x_t, t, y, drop_mask=drop_mask)
    d_f, d_i = out[0], out[1]
    heads = list(d_i) if isinstance(d_i, (list, tuple)) else [d_i]
    main = _mean_flat((d_f.float() - target.float()) ** 2)
    aux = torch.stack([_mean_flat((h.float() - target.float()) ** 2) for h in heads]).mean(0)
    cos = channel_cosine_loss(d_f, target) if cosine_loss else torch.zeros_like(main)
    return {"loss": main + aux_weight * aux + cos, "main": main, "aux": aux, "cos": cos}
