"""How far the reference Muon's weights move when its gradients change in the last bit: the scale against which
a ZeRO-3 Muon run (whose backward sums some gradients in another fp32 order) departs from a ZeRO-0 one.

One process, the small LightningDiT+IG of tests/test_muon_sharded.py, the reference MuonWithAdam (clip 1.0), the
same batches twice; the second run moves a random half of every gradient's entries to the next float up, every
step. Prints the largest weight difference after each step, next to the size of one step's update.

    python bench/muon_sensitivity.py [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igscale.config.load import load_config  # noqa: E402
from igscale.diffusion.losses import ig_loss  # noqa: E402
from igscale.models import build_model  # noqa: E402
from igscale.training.muon import MuonWithAdam, muon_param_groups  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["model.name=LightningDiT-B/1", "model.input_size=8", "model.in_channels=4", "model.hidden_size=64",
             "model.depth=4", "model.num_heads=2", "optim.name=muon", "optim.muon_lr=1e-2", "engine.precision=fp32",
             "engine.zero_stage=0"]


def run(cfg, steps: int, perturb: bool) -> list[dict[str, torch.Tensor]]:
    o = cfg.optim
    torch.manual_seed(0)
    model = build_model(cfg.model.name, **cfg.model.arch_overrides())
    groups = muon_param_groups(model.named_parameters(), muon_lr=o.muon_lr, muon_wd=o.muon_weight_decay,
                               momentum=o.muon_momentum, ns_steps=o.muon_ns_steps, adam_lr=o.lr, betas=o.betas,
                               eps=o.eps, adam_wd=o.weight_decay)
    opt = MuonWithAdam(groups, max_grad_norm=cfg.engine.grad_clip)
    data, flips = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    shape = (8, *model.config.latent_shape)
    out = []
    for _ in range(steps):
        x, y = torch.randn(shape, generator=data), torch.randint(0, model.config.num_classes, (8,), generator=data)
        t, noise = torch.rand(8, generator=data), torch.randn(shape, generator=data)
        terms = ig_loss(model, x, y, t, noise, path="linear", aux_weight=0.5, cosine_loss=True,
                        drop_mask=torch.zeros(8, dtype=torch.bool))
        opt.zero_grad()
        terms["loss"].mean().backward()
        if perturb:
            for p in model.parameters():
                if p.grad is not None:
                    up = torch.nextafter(p.grad, torch.full_like(p.grad, float("inf")))
                    p.grad.copy_(torch.where(torch.rand(p.grad.shape, generator=flips) < 0.5, up, p.grad))
        opt.step()
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), OVERRIDES)
    ref, moved = run(cfg, a.steps, False), run(cfg, a.steps, True)
    print(f"{'step':>4} {'max |w - w(last-bit grads)|':>28} {'max |one step update|':>22}")
    prev = None
    for s, (w, v) in enumerate(zip(ref, moved), 1):
        d = max((w[k] - v[k]).abs().max().item() for k in w)
        u = max((w[k] - prev[k]).abs().max().item() for k in w) if prev else float("nan")
        print(f"{s:>4} {d:>28.2e} {u:>22.2e}")
        prev = w


if __name__ == "__main__":
    main()
