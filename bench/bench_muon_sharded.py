"""Muon's optimizer step and optimizer state per rank at ZeRO-0 (replicated), 1, 2 and 3, on 2 gloo ranks.

Every column is built by `build_engine` from configs/lightningdit_xl1_ig.yaml's recipe (what `igscale train` runs),
at a LightningDiT+IG size whose Newton-Schulz work dominates a CPU step (default hidden 384, depth 6). Each rep
runs a backward, then times the engine's optimizer step (DeepSpeed's step around the client optimizer: at ZeRO-2/3
its partition handling and igscale's two all-to-alls, at ZeRO-1 the all-gather), best of --reps. The state is
the bytes each rank's optimizer keeps between steps (its moments); at ZeRO-2/3 the owned tensors' whole fp32
weights and gradients exist during the step only (printed), and DeepSpeed's fp32 master partitions come on top as
for any optimizer.

    python bench/bench_muon_sharded.py [--hidden 384] [--depth 6] [--reps 5] [--stages 0,1,2,3]
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
    t, noise = torch.rand(2, generator=g), torch.randn(2, *shape, generator=g)
    opt = engine.client_optimizer
    times = []
    for _ in range(a.reps):
        terms = ig_loss(engine, x, y, t, noise, path="linear", aux_weight=0.5, cosine_loss=True,
                        drop_mask=torch.zeros(2, dtype=torch.bool))
        engine.backward(terms["loss"].mean())
        dist.barrier()
        t0 = time.perf_counter()
        engine.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    inner = getattr(opt, "inner", opt)  # ZeRO-2/3: the owners' reference optimizer
    state = sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values() if torch.is_tensor(v))
    out = [None] * env.world_size
    dist.all_gather_object(out, {"step_s": min(times), "state_bytes": state, "ns": getattr(opt, "ns_per_step", None),
                                 "step_buffer_bytes": getattr(opt, "step_buffer_bytes", 0)})
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
    p.add_argument("--stages", default="0,1,2,3", help="ZeRO stages to compare; the first is the ratios' base")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    common = ["--hidden", str(a.hidden), "--depth", str(a.depth), "--reps", str(a.reps)]
    stages = [int(v) for v in a.stages.split(",")]
    res = {st: _launch("--stage", str(st), *common) for st in stages}
    base = stages[0]
    print(f"LightningDiT+IG hidden {a.hidden} depth {a.depth}: {res[base]['params'] / 1e6:.1f}M parameters, 2 ranks; "
          f"ratios against ZeRO-{base}")
    print(f"{'':>26}" + "".join(f"{f'ZeRO-{st}':>12}{'ratio':>7}" for st in stages))
    step = {st: max(r["step_s"] for r in res[st]["ranks"]) for st in stages}
    mem = {st: max(r["state_bytes"] for r in res[st]["ranks"]) for st in stages}
    print(f"{'optimizer step (slowest)':>26}" + "".join(f"{step[st]:>10.3f} s{step[st] / step[base]:>7.2f}"
                                                       for st in stages))
    print(f"{'state per rank (largest)':>26}" + "".join(f"{mem[st] / 2**20:>8.1f} MiB{mem[st] / mem[base]:>7.2f}"
                                                       for st in stages))
    for st in stages:
        extra = max(r["step_buffer_bytes"] for r in res[st]["ranks"])
        print(f"ZeRO-{st}: {res[st]['optimizer']}; Newton-Schulz per rank per step: "
              f"{[r['ns'] for r in res[st]['ranks']]}" + (f"; whole owned tensors during the step: "
                                                          f"{extra / 2**20:.1f} MiB" if extra else ""))

if __name__ == "__main__":
    main()
