"""Linear layers with an optional batch-invariant mode.

GEMM libraries choose their blocking from the full problem shape, so a sample's output can change in the last bit
when the batch it is computed in changes size (M = B·T rows). That breaks "identical images for any per-GPU batch
size". Inside `with batch_invariant():` every linear runs as one GEMM per sample (bmm over the batch with a
broadcast weight), whose shape does not depend on B; a batch of one is padded to two so that the same batched
kernel runs. Outside the context it is plain F.linear (the training and benchmark path).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["batch_invariant_enabled", "batch_invariant", "linear", "Linear"]

_state = threading.local()


def batch_invariant_enabled() -> bool:
    return getattr(_state, "enabled", False)


@contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    prev = batch_invariant_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = prev


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, ..., Din) @ weight (Dout, Din)ᵀ + bias."""
    if not batch_invariant_enabled() or x.dim() < 2:
        return F.linear(x, weight, bias)
    shape = x.shape
    x3 = x.reshape(shape[0], -1, shape[-1])  # (B, N, Din): one GEMM per sample
    B = x3.shape[0]
    if B == 1:
        x3 = torch.cat([x3, x3])
    out = torch.bmm(x3, weight.t().unsqueeze(0).expand(x3.shape[0], -1, -1))[:B]  # (B, N, Dout)
    if bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) that honours `batch_invariant()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
