"""Exponential moving average of the weights, kept in fp32 and ZeRO-stage agnostic.

The EMA never sees DeepSpeed: it is handed `views`, a list of (name, tensor) pairs with the rank's own fp32 view of
each parameter (`DeepSpeedEngine.param_views`). Where the engine shards its fp32 master weights (ZeRO-3's partition,
ZeRO-1/2's fragments) the view is the rank's slice, so the EMA is sharded exactly like them and its update needs no
communication; otherwise it is the full parameter and every rank holds an identical full EMA. `full_state_dict`
takes a `gather(name, shard) -> full tensor` callable to assemble the full EMA.
The update is one foreach lerp over all tensors (a few fused kernels instead of one launch per parameter); the
per-tensor loop stays as `foreach=False`, the structure of the official trainers, for benchmarks and tests.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["EMA"]


class EMA:
    def __init__(self, views: Iterable[tuple[str, torch.Tensor]], decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        # The initial EMA is an exact copy of the weights (decay 0 at step 0), as in the official update_ema.
        self.shadow: dict[str, torch.Tensor] = {n: v.detach().float().clone() for n, v in views}
        self._names = list(self.shadow)
        self._list = [self.shadow[n] for n in self._names]  # same tensors, in view order, for the foreach kernels

    @torch.no_grad()
    def update(self, views: Iterable[tuple[str, torch.Tensor]], decay: float | None = None, *,
               foreach: bool = True) -> None:
        """ema <- lerp(ema, w, 1 - decay), in fp32. `views` come in the order the EMA was built with."""
        d = self.decay if decay is None else decay
        views = list(views)
        if [n for n, _ in views] != self._names:
            raise ValueError("EMA.update: views must name the same parameters, in the same order, as at construction")
        ws = [v.detach() if v.dtype == torch.float32 else v.detach().float() for _, v in views]
        if foreach:
            torch._foreach_lerp_(self._list, ws, 1.0 - d)
        else:
            for e, w in zip(self._list, ws):
                e.lerp_(w, 1.0 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for n, t in state["shadow"].items():
            if t.shape != self.shadow[n].shape:
                raise ValueError(f"EMA {n}: checkpoint shape {tuple(t.shape)} != {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(t)

    def full_state_dict(self, gather: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Full fp32 EMA tensors by parameter name (gathering shards under ZeRO-3)."""
        if gather is None:
            return {n: t.clone() for n, t in self.shadow.items()}
        return {n: gather(n, t) for n, t in self.shadow.items()}
