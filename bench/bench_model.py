"""CPU forward+backward timing of a small IGDiT, with and without the IG head loss, side by side in one run.

    python bench/bench_model.py [--model SiT-S/2] [--batch 16] [--iters 10]

Prints img/s for (a) forward+backward of the main loss only, (b) main + IG auxiliary loss, and their ratio (the cost of the
auxiliary supervision), plus the estimated training GFLOP per image.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from igscale.diffusion.losses import ig_loss
from igscale.models import build_model
from igscale.models.flops import train_flops_per_image


def _time(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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
    m = build_model(a.model, input_size=a.input_size, ig_layers=(4,))
    C, H, W = m.config.latent_shape
    x0, eps = torch.randn(a.batch, C, H, W), torch.randn(a.batch, C, H, W)
    y, t = torch.randint(0, 1000, (a.batch,)), torch.rand(a.batch)

    def step(aux_weight: float):
        m.zero_grad(set_to_none=True)
        ig_loss(m.forward_heads, x0, y, t, eps, aux_weight=aux_weight)["loss"].mean().backward()

    t_main = _time(lambda: step(0.0), a.iters)
    t_ig = _time(lambda: step(0.5), a.iters)
    gf = train_flops_per_image(m.config) / 1e9
    print(f"model {a.model} input {a.input_size} params {m.num_params() / 1e6:.2f}M batch {a.batch} "
          f"threads {torch.get_num_threads()} train GFLOP/img {gf:.2f}")
    print(f"{'variant':<24}{'s/step':>10}{'img/s':>10}{'GFLOP/s':>10}")
    for name, s in (("main loss only", t_main), ("main + IG aux loss", t_ig)):
        print(f"{name:<24}{s:>10.4f}{a.batch / s:>10.1f}{gf * a.batch / s:>10.1f}")
    print(f"IG aux supervision cost ratio (step time with/without): {t_ig / t_main:.3f}")


if __name__ == "__main__":
    main()
