"""Shared test helpers for the core math tests: an analytic Gaussian velocity model and a tiny DiT factory."""
from __future__ import annotations

import torch

from igscale.models import build_model


def tiny_model(name: str = "SiT-S/2", **kw):
    base = dict(input_size=8, in_channels=4, hidden_size=64, depth=4, num_heads=2, ig_layers=(2,), num_classes=10)
    if name.startswith("LightningDiT"):
        base.update(in_channels=8, patch_size=1)
    base.update(kw)
    return build_model(name, **base)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Replace zero-initialised weights with random ones so that every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n == "pos_embed":
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in n else 0.0))  # norms stay near 1
    return model


class GaussianVelocity:
    """Exact linear-path velocity of data N(mu[y], diag s²): the ground-truth denoiser for sampler tests.

    With alpha = 1-t, sigma = t:  v(x, t) = -mu + (-(1-t)s² + t) / ((1-t)² s² + t²) · (x - (1-t) mu).
    D_i is the exact velocity of a different Gaussian (mu_i, s_i), standing in for the weaker intermediate head.
    """

    def __init__(self, mu: torch.Tensor, s: torch.Tensor, mu_i=None, s_i=None):
        self.mu, self.s = mu.double(), s.double()  # (K, *shape), (*shape)
        self.mu_i = self.mu * 0.5 if mu_i is None else mu_i.double()
        self.s_i = self.s * 1.3 if s_i is None else s_i.double()
        self.calls = 0

    @staticmethod
    def velocity(x, t, mu, s):
        t = t.reshape(-1, *([1] * (x.dim() - 1))).double()
        a, sig = 1 - t, t
        return -mu + (-a * s**2 + sig) / (a**2 * s**2 + sig**2) * (x.double() - a * mu)

    def __call__(self, x, t, y):
        self.calls += 1
        y = y.clamp(max=self.mu.shape[0] - 1)  # the null class maps to the last table row
        d_f = self.velocity(x, t, self.mu[y], self.s)
        d_i = self.velocity(x, t, self.mu_i[y], self.s_i)
        return d_f.to(x.dtype), d_i.to(x.dtype)


def one_rank_group(backend: str):
    """Generator for a module fixture: a real one-rank process group of `backend` in this pytest process, joined by
    DeepSpeed; torn down (and the launcher variables removed) afterwards."""
    import os

    import pytest
    import torch.distributed as dist

    from igscale.demo.local_s3 import free_ports

    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_ports(1)[0]), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=0, world_size=1)
    from igscale.distributed.engine import init_deepspeed_distributed

    init_deepspeed_distributed()
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)
