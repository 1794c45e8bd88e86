"""Muon's optimizer cost per GPU for a model of the registry, replicated (ZeRO-0, today) vs sharded over the ranks.

Counted from the model's own parameter shapes (built on the meta device, nothing allocated), with the trainer's
grouping, Newton-Schulz cost (`muon_sharded.ns_flops`) and owner assignment (`muon_sharded.assign_owners`): Muon
momentum (fp32) on trainable >= 2-D weights, Adam moments (2 x fp32) on the rest; sharded, each rank holds and
orthogonalises its owned tensors.

    python bench/muon_projection.py [--model LightningDiT-XL/1] [--gpus 8 64] [--ns-steps 5]
"""
from __future__ import annotations

import argparse


def main() -> None:
    import torch

    from igscale.models import build_model
    from igscale.training.muon import muon_param_groups
    from igscale.training.muon_sharded import assign_owners, ns_flops

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="LightningDiT-XL/1")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    p.add_argument("--ns-steps", type=int, default=5)
    a = p.parse_args()
    with torch.device("meta"):
        model = build_model(a.model)
    # the trainer's own grouping and owner assignment (igscale.training.muon_sharded)
    groups = muon_param_groups(model.named_parameters(), muon_lr=1.0, muon_wd=0.0, momentum=0.95,
                               ns_steps=a.ns_steps, adam_lr=1.0, betas=(0.9, 0.95), eps=1e-8, adam_wd=0.0)
    muon = [q for g in groups if g["use_muon"] for q in g["params"]]
    adam = [q for g in groups if not g["use_muon"] for q in g["params"]]
    state = lambda q, g: (4 if g["use_muon"] else 8) * q.numel()  # noqa: E731 - momentum / two Adam moments
    total_state = sum(state(q, g) for g in groups for q in g["params"])
    total_flops = sum(ns_flops(q.shape, a.ns_steps) for q in muon)
    print(f"{a.model}: {len(muon)} Muon matrices ({sum(q.numel() for q in muon) / 1e6:.1f}M weights), "
          f"{sum(q.numel() for q in adam) / 1e6:.2f}M Adam weights")
    print(f"{'GPUs':>5} {'state/GPU replicated':>21} {'state/GPU sharded':>18} {'NS TFLOP/GPU/step repl.':>24} "
          f"{'sharded':>8} {'max/mean':>8}")
    for w in a.gpus:
        loads = [[0.0, 0.0] for _ in range(w)]  # (state bytes, NS FLOPs) per rank
        for g, owners in zip(groups, assign_owners(groups, w)):
            for q, r in zip(g["params"], owners):
                loads[r][0] += state(q, g)
                loads[r][1] += ns_flops(q.shape, a.ns_steps) if g["use_muon"] else 0.0
        top = max(x[1] for x in loads)
        print(f"{w:>5} {total_state / 2**30:>18.2f} GiB {max(x[0] for x in loads) / 2**30:>14.3f} GiB "
              f"{total_flops / 1e12:>24.3f} {top / 1e12:>8.4f} {top / (total_flops / w):>8.2f}")


if __name__ == "__main__":
    main()
