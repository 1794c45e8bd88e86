"""Muon's optimizer step and optimizer state per rank: replicated (ZeRO-0) vs sharded (ZeRO-1), 2 gloo ranks.

Both sides are built by `build_engine` from configs/lightningdit_xl1_ig.yaml's recipe (what `igscale train` runs),
at a LightningDiT+IG size whose Newton-Schulz work dominates a CPU step (default hidden 384, depth 6). After one
backward, the client optimizer's `step()` is timed on the same gradients, best of --reps (the sharded step includes
its all-gather); the state is the bytes of the tensors each rank's optimizer holds after it.

    python bench/bench_muon_sharded.py [--hidden 384] [--depth 6] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.torchrun_launch import torchrun  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from igscale.config.load import load_config
    from igscale.diffusion.losses import ig_loss
    from igscale.distributed.engine import init_deepspeed_distributed
    from igscale.distributed.env import detect_env, device_for, init_distributed
    from igscale.training.build import build_engine

    env = init_distributed(detect_env())
    init_deepspeed_distributed()
    cfg = load_config(os.path.join(ROOT, "configs", "lightningdit_xl1_ig.yaml"), [
        f"engine.zero_stage={a.stage}", "engine.precision=fp32", "engine.tf32=false", "train.global_batch=4",
        "model.input_size=8", f"model.hidden_size={a.hidden}", f"model.depth={a.depth}",
        f"model.num_heads={a.hidden // 64}", "model.ig_layers=[2]", "data.manifest_url=unused"])
    engine, _ = build_engine(cfg, world_size=env.world_size, device=device_for(env))
    shape = tuple(engine.module.config.latent_shape)
    g = torch.Generator().manual_seed(env.rank)
    x, y = torch.randn(2, *shape, generator=g), torch.zeros(2, dtype=torch.long)
    terms = ig_loss(engine, x, y, torch.rand(2, generator=g), torch.randn(2, *shape, generator=g), path="linear",
                    aux_weight=0.5, cosine_loss=True, drop_mask=torch.zeros(2, dtype=torch.bool))
    engine.backward(terms["loss"].mean())
    opt = engine.client_optimizer
    times = []
    for _ in range(a.reps):
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    out = [None] * env.world_size
    dist.all_gather_object(out, {"step_s": min(times), "state_bytes": state, "ns": getattr(opt, "ns_per_step", None)})
    if env.rank == 0:
        params = sum(p.numel() for p in engine.module.parameters())
        print(json.dumps({"ranks": out, "params": params, "optimizer": type(opt).__name__}), flush=True)
    dist.destroy_process_group()


def _launch(*args: str) -> dict:
    out = torchrun(__file__, 2, *args)
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    common = ["--hidden", str(a.hidden), "--depth", str(a.depth), "--reps", str(a.reps)]
    res = {st: _launch("--stage", str(st), *common) for st in (0, 1)}
    print(f"LightningDiT+IG hidden {a.hidden} depth {a.depth}: {res[0]['params'] / 1e6:.1f}M parameters, 2 ranks")
    print(f"{'':>24} {'ZeRO-0 (replicated)':>20} {'ZeRO-1 (sharded)':>17} {'ratio':>7}")
    step = [max(r["step_s"] for r in res[st]["ranks"]) for st in (0, 1)]
    mem = [max(r["state_bytes"] for r in res[st]["ranks"]) for st in (0, 1)]
    print(f"{'optimizer step (slowest)':>24} {step[0]:>18.3f} s {step[1]:>15.3f} s {step[1] / step[0]:>7.2f}")
    print(f"{'state per rank (largest)':>24} {mem[0] / 2**20:>16.1f} MiB {mem[1] / 2**20:>13.1f} MiB "
          f"{mem[1] / mem[0]:>7.2f}")
    print(f"optimizers: {res[0]['optimizer']} / {res[1]['optimizer']}; Newton-Schulz per rank per step (sharded): "
          f"{[r['ns'] for r in res[1]['ranks']]}")


if __name__ == "__main__":
    main()
