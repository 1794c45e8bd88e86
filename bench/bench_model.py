"""CPU timing of a small IGDiT: forward+backward of the IG training loss next to a no-grad forward, in one run.

    python bench/bench_model.py [--model SiT-S/2] [--batch 16] [--iters 10]

Prints img/s and achieved GFLOP/s for (a) the training step's forward+backward (main + 0.5·aux IG loss) and (b) one
no-grad forward (one sampling NFE), and the time ratio (b)/(a) next to the 3× that the FLOP convention assumes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from igscale.diffusion.losses import ig_loss
from igscale.models import build_model
from igscale.models.flops import train_flops_per_image


def _time_interleaved(fns, iters: int, warmup: int = 2) -> list[float]:
    """Median seconds per call of each fn, alternating them so that machine load affects all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for _ in range(iters):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SiT-S/2")
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = build_model(a.model, input_size=a.input_size, ig_layers=(4,)).train()
    C, H, W = m.config.latent_shape
    x0, eps = torch.randn(a.batch, C, H, W), torch.randn(a.batch, C, H, W)
    y, t = torch.randint(0, 1000, (a.batch,)), torch.rand(a.batch)

    def train_step():
        m.zero_grad(set_to_none=True)
        ig_loss(m.forward_heads, x0, y, t, eps, aux_weight=0.5)["loss"].mean().backward()

    @torch.no_grad()
    def forward():
        m(x0, t, y)

    t_train, t_fwd = _time_interleaved([train_step, forward], a.iters)
    gf_train = train_flops_per_image(m.config) / 1e9
    gf_fwd = gf_train / 3
    print(f"model {a.model} input {a.input_size} params {m.num_params() / 1e6:.2f}M batch {a.batch} "
          f"threads {torch.get_num_threads()} train GFLOP/img {gf_train:.2f}")
    print(f"{'variant':<26}{'s/call':>10}{'img/s':>10}{'GFLOP/s':>10}")
    for name, s, gf in (("fwd+bwd (IG loss)", t_train, gf_train), ("forward (1 NFE, no grad)", t_fwd, gf_fwd)):
        print(f"{name:<26}{s:>10.4f}{a.batch / s:>10.1f}{gf * a.batch / s:>10.1f}")
    print(f"train/forward time ratio: {t_train / t_fwd:.2f} (FLOP convention: 3.00)")


if __name__ == "__main__":
    main()
