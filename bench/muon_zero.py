"""How far DeepSpeed's own Muon (ZeRO-1/2/3) is from igscale's reference Muon (ZeRO-0), step by step.

Both sides train the same small LightningDiT+IG from the same weights on the same per-rank batches and noise, on 2
gloo ranks, for --steps steps. The reference is igscale's MuonWithAdam passed to DeepSpeed at ZeRO-0. DeepSpeed's
side is its config-built Muon (`"optimizer": {"type": "Muon"}`) with igscale's grouping mapped onto its
extension points: `use_muon` on the >= 2-D trainable weights, one param group per matrix shape carrying the
reference's shape-scaled LR (lr * 0.2 * sqrt(max(rows, cols))) and a weight decay rescaled so that lr * wd stays
the reference's, and ns_method "standard" (bf16 quintic Newton-Schulz, as the reference).
Printed after every step: ||w_deepspeed - w_reference|| / ||w_reference - w_0||, Muon and Adam parameters apart.

    python bench/muon_zero.py [--stages 1 2 3] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.torchrun_launch import torchrun  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUON_LR, ADAM_LR, WD, MOM = 2e-2, 2e-3, 0.01, 0.95


def _model():
    import torch

    from igscale.models import build_model

    torch.manual_seed(0)
    return build_model("LightningDiT-B/1", input_size=8, in_channels=4, hidden_size=64, depth=4, num_heads=2,
                       num_classes=10, ig_layers=(2,))


def _ds_groups(model):
    """igscale's grouping as DeepSpeed param groups: Muon weights by shape (its LR scaling), Adam the rest."""
    by_shape: dict[int, list] = {}
    adam = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        p.use_muon = p.ndim >= 2
        if p.use_muon:
            by_shape.setdefault(max(p.shape[0], p.shape[1]), []).append(p)
        else:
            adam.append(p)
    groups = []
    for big, ps in sorted(by_shape.items()):
        lr = MUON_LR * 0.2 * math.sqrt(big)
        groups.append({"params": ps, "lr": lr, "weight_decay": WD * MUON_LR / lr})
    groups.append({"params": adam, "lr": ADAM_LR, "weight_decay": 0.0})
    return groups


def worker(a) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from igscale.diffusion.losses import ig_loss
    from igscale.distributed.engine import init_deepspeed_distributed
    from igscale.distributed.env import detect_env, init_distributed
    from igscale.training.muon import MuonWithAdam, muon_param_groups

    env = init_distributed(detect_env())
    init_deepspeed_distributed()
    model = _model()
    ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": a.stage}, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    if a.impl == "ds" and a.stage == 3:
        ds["zero_optimization"]["reduce_scatter"] = False  # DeepSpeed refuses Muon with ZeRO-3's reduce-scatter
    if a.impl == "ref":
        opt = MuonWithAdam(muon_param_groups(model.named_parameters(), muon_lr=MUON_LR, muon_wd=WD, momentum=MOM,
                                             ns_steps=5, adam_lr=ADAM_LR, betas=(0.9, 0.95), eps=1e-8, adam_wd=0.0))
        eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds,
                                       model_parameters=[p for p in model.parameters() if p.requires_grad])
    else:
        ds["optimizer"] = {"type": "Muon", "params": {"lr": MUON_LR, "momentum": MOM, "weight_decay": WD,
                                                      "ns_method": "standard", "betas": [0.9, 0.95], "eps": 1e-8}}
        eng, *_ = deepspeed.initialize(model=model, model_parameters=_ds_groups(model), config=ds)
    g = torch.Generator().manual_seed(1000 + env.rank)
    def snap():
        with deepspeed.zero.GatheredParameters(list(eng.module.parameters()), enabled=a.stage == 3):
            return {n: p.detach().float().clone() for n, p in eng.module.named_parameters() if p.requires_grad}

    traj = [snap()]
    for _ in range(a.steps):
        x0 = torch.randn(4, 4, 8, 8, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        t, noise = torch.rand(4, generator=g), torch.randn(4, 4, 8, 8, generator=g)
        terms = ig_loss(eng, x0, y, t, noise, path="linear", aux_weight=0.5, cosine_loss=True,
                        drop_mask=torch.zeros(4, dtype=torch.bool))
        eng.backward(terms["loss"].mean())
        eng.step()
        traj.append(snap())
    if dist.get_rank() == 0:
        torch.save({"traj": traj, "muon": [n for n, p in eng.module.named_parameters() if p.ndim >= 2]}, a.out)
    dist.destroy_process_group()


def _launch(*args: str) -> None:
    torchrun(__file__, 2, *args)


def _rel(r: dict, g: dict, w0: dict, names: list[str]) -> float:
    """||g - r|| / ||r - w0|| over `names`: the difference relative to how far the reference has moved."""
    num = sum(float(((r[n] - g[n]) ** 2).sum()) for n in names)
    return math.sqrt(num / sum(float(((r[n] - w0[n]) ** 2).sum()) for n in names))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ref", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    import torch

    with tempfile.TemporaryDirectory() as d:
        _launch("--impl", "ref", "--stage", "0", "--steps", str(a.steps), "--out", f"{d}/ref.pt")
        ref = torch.load(f"{d}/ref.pt", weights_only=True)
        rows = {}
        for st in a.stages:
            _launch("--impl", "ds", "--stage", str(st), "--steps", str(a.steps), "--out", f"{d}/ds{st}.pt")
            got = torch.load(f"{d}/ds{st}.pt", weights_only=True)
            per = []
            w0 = ref["traj"][0]
            assert all(torch.equal(w0[n], got["traj"][0][n]) for n in w0)  # the same start
            for r, g in zip(ref["traj"][1:], got["traj"][1:]):
                muon = [n for n in r if n in ref["muon"]]
                per.append((_rel(r, g, w0, muon), _rel(r, g, w0, [n for n in r if n not in muon])))
            rows[st] = per
    print(json.dumps({str(k): v for k, v in rows.items()}))
    print(f"{'step':>4} " + " ".join(f"{'ZeRO-' + str(s) + ' muon':>12} {'adam':>9}" for s in rows))
    for i in range(a.steps):
        print(f"{i + 1:>4} " + " ".join(f"{rows[s][i][0]:>12.2e} {rows[s][i][1]:>9.2e}" for s in rows))


if __name__ == "__main__":
    main()
