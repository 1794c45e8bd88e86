"""Sampling throughput on one device: IG-only vs CFG+IG (and CFG+IG with the SiT guidance interval), one run.

IG needs no extra network evaluation (D_i and D_f come from one forward pass); CFG doubles the batch rows wherever
it is active. The script reports img/s, img·NFE/s (images x sampler NFE per second) and model rows evaluated per
sample per step, interleaving the settings over repeats and taking medians so load drift hits all of them alike.

  python bench/bench_sampling.py                      # small CPU model
  python bench/bench_sampling.py --model SiT-XL/2 --size 32 --batch 64 --steps 20 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.noise import per_sample_randn
from igscale.diffusion.samplers import SamplerConfig, sample
from igscale.models import build_model

SETTINGS = {
    "no guidance": GuidanceConfig(),
    "IG only (w_ig 1.4)": GuidanceConfig(w_ig=1.4),
    "CFG+IG (w_cfg 1.5 on [0,1], w_ig 1.4)": GuidanceConfig(w_cfg=1.5, w_ig=1.4),
    "CFG+IG (w_cfg 1.35 on [0,0.7], w_ig 1.4)": GuidanceConfig(w_cfg=1.35, cfg_interval=(0.0, 0.7), w_ig=1.4),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SiT-S/2")
    p.add_argument("--size", type=int, default=16, help="latent input size")
    p.add_argument("--hidden", type=int, default=256, help="override hidden size (0 = model default)")
    p.add_argument("--depth", type=int, default=8, help="override depth (0 = model default)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is robust on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    over = {"input_size": args.size, "ig_layers": (max(1, (args.depth or 28) // 2),)}
    if args.hidden:
        over.update(hidden_size=args.hidden, num_heads=args.heads)
    if args.depth:
        over.update(depth=args.depth)
    model = build_model(args.model, **over).to(args.device).eval()
    c = model.config
    seeds = list(range(args.batch))
    noise = per_sample_randn(seeds, (c.in_channels, c.input_size, c.input_size), device=args.device)
    y = torch.arange(args.batch, device=args.device) % c.num_classes
    sampler = SamplerConfig(method="euler", num_steps=args.steps)

    def run(g):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, st = sample(model, noise, y, sampler, g, null_class=c.num_classes, seeds=seeds, return_stats=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, st

    run(SETTINGS["no guidance"])  # warm-up
    times = {k: [] for k in SETTINGS}
    stats = {}
    for _ in range(args.repeats):
        for k, g in SETTINGS.items():
            dt, stats[k] = run(g)
            times[k].append(dt)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model {args.model} overrides {over} ({params:.1f}M params), batch {args.batch}, Euler {args.steps} steps "
          f"(NFE {sampler.nfe()}), device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print("| setting | s/batch | img/s | img·NFE/s | model rows per sample per step | time vs IG only |")
    print("|---|---|---|---|---|---|")
    ig = statistics.median(times["IG only (w_ig 1.4)"])
    for k in SETTINGS:
        t = statistics.median(times[k])
        rows = stats[k]["rows_per_sample"] / args.steps
        print(f"| {k} | {t:.3f} | {args.batch / t:.1f} | {args.batch * sampler.nfe() / t:.1f} | {rows:.2f} | "
              f"{t / ig:.2f}x |")


if __name__ == "__main__":
    main()
