"""Run under torchrun on 2 ranks: train a small LightningDiT+IG with Muon at ZeRO-0 (2 steps), then at ZeRO-3
(10 steps), on the same synthetic batches from the same initial weights, and record per step the whole gradient
each optimizer updated from (after clipping). Rank r saves OUT_r.pt:

    {"init": initial weights, "final3": weights after the ZeRO-3 steps,
     "grads0": [step -> {tensor index: gradient}], "grads3": [... this rank's owned tensors only]}

    torchrun --nproc_per_node 2 -m tests.muon_zero_probe OUT key=value ...
"""
from __future__ import annotations

import sys

import torch


def _record(opt, into: list[dict]) -> None:
    """Wrap the update of the optimizer that owns whole tensors so each step's gradients are kept."""
    from igscale.training.muon_zero import ZeroMuonWithAdam

    ref = opt.inner if isinstance(opt, ZeroMuonWithAdam) else opt
    tensors = ([opt._full[k] for k in opt._mine] if isinstance(opt, ZeroMuonWithAdam)
               else [p for g in opt.param_groups for p in g["params"]])
    keys = list(opt._mine) if isinstance(opt, ZeroMuonWithAdam) else list(range(len(tensors)))
    inner = ref._update

    def update():
        into.append({k: t.grad.detach().clone() for k, t in zip(keys, tensors)})
        inner()

    ref._update = update


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    from igscale.config.load import load_config
    from igscale.distributed.engine import init_deepspeed_distributed
    from igscale.training.build import build_engine
    from igscale.training.step import train_step

    out, overrides = argv[0], argv[1:]
    init_deepspeed_distributed()
    ws, rank, cpu = dist.get_world_size(), dist.get_rank(), torch.device("cpu")
    saved: dict = {}
    for stage, steps in ((0, 2), (3, 10)):
        cfg = load_config("configs/tiny_cpu.yaml", [*overrides, f"engine.zero_stage={stage}"])
        engine, _ = build_engine(cfg, world_size=ws, device=cpu)
        if stage == 0:
            saved["init"] = engine.full_state_dict()
        grads: list[dict] = []
        _record(engine.client_optimizer, grads)
        gen = torch.Generator().manual_seed(0)
        mb = cfg.micro_batch(ws)
        for step in range(steps):
            x = torch.randn(mb * ws, 4, 8, 8, generator=gen)
            y = torch.randint(0, engine.module.config.num_classes, (mb * ws,), generator=gen)
            batch = {"latent": x[rank * mb:(rank + 1) * mb], "label": y[rank * mb:(rank + 1) * mb]}
            train_step(engine, [batch], cfg, rank=rank, world_size=ws, step=step, device=cpu)
        saved[f"grads{stage}"] = grads
        if stage == 3:
            saved["final3"] = engine.full_state_dict()
    torch.save(saved, f"{out}_{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
