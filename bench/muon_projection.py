"""Muon's optimizer cost per GPU for a model of the registry, replicated (ZeRO-0, today) vs sharded over the ranks.

Counted from the model's own parameter shapes (built on the meta device, nothing allocated), with igscale's grouping:
Muon momentum (fp32) on trainable >= 2-D weights, Adam moments (2 x fp32) on the rest. Newton-Schulz FLOPs per
matrix of r x c (r <= c, the orientation the iteration runs on): per iteration X X^T (2 r^2 c), A A (2 r^3) and
B X (2 r^2 c). Sharded: each rank orthogonalises its share of the matrices (greedy, largest first, onto the least
loaded rank), so its FLOPs and state are its share's.

    python bench/muon_projection.py [--model LightningDiT-XL/1] [--gpus 8 64] [--ns-steps 5]
"""
from __future__ import annotations

import argparse


def ns_flops(rows: int, cols: int, steps: int) -> float:
    r, c = min(rows, cols), max(rows, cols)
    return steps * (4.0 * r * r * c + 2.0 * r ** 3)


def main() -> None:
    import torch

    from igscale.models import build_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="LightningDiT-XL/1")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    p.add_argument("--ns-steps", type=int, default=5)
    a = p.parse_args()
    with torch.device("meta"):
        model = build_model(a.model)
    muon, adam = [], 0
    for q in model.parameters():
        if not q.requires_grad:
            continue
        if q.ndim >= 2:
            m = q.reshape(q.shape[0], -1)
            muon.append((q.numel(), ns_flops(m.shape[0], m.shape[1], a.ns_steps)))
        else:
            adam += q.numel()
    total_state = 4 * sum(n for n, _ in muon) + 8 * adam
    total_flops = sum(f for _, f in muon)
    print(f"{a.model}: {len(muon)} Muon matrices ({sum(n for n, _ in muon) / 1e6:.1f}M weights), "
          f"{adam / 1e6:.2f}M Adam weights")
    print(f"{'GPUs':>5} {'state/GPU replicated':>21} {'state/GPU sharded':>18} {'NS TFLOP/GPU/step repl.':>24} "
          f"{'sharded':>8} {'max/mean':>8}")
    for w in a.gpus:
        loads = [[0.0, 0.0] for _ in range(w)]  # (state bytes, flops) per rank
        for n, f in sorted(muon, key=lambda t: -t[1]):
            tgt = min(loads, key=lambda x: x[1])
            tgt[0] += 4 * n
            tgt[1] += f
        top = max(loads, key=lambda x: x[1])
        adam_share = 8 * adam / w  # Adam moments split by element
        print(f"{w:>5} {total_state / 2**30:>18.2f} GiB {(max(x[0] for x in loads) + adam_share) / 2**30:>14.3f} GiB "
              f"{total_flops / 1e12:>24.3f} {top[1] / 1e12:>8.4f} {top[1] / (total_flops / w):>8.2f}")


if __name__ == "__main__":
    main()
