"""Elastic resume cost: DeepSpeed's universal conversion of a real-size checkpoint, and the loads on either side.

For each ZeRO stage: 2 gloo ranks build the SiT-B/2+IG engine of configs/sit_b2_ig.yaml (the code `igscale train`
runs), take one optimizer step on random latents (so Adam's moments exist) and save the DeepSpeed tag. Then, in
this one run: the same-size load at 2 ranks, the conversion (igscale.checkpoint.universal.convert, what a resume at
another size runs on rank 0), and the universal load at 1 rank, each timed, with the tag's and the universal
folder's sizes.

    python bench/bench_universal.py [--stages 2 3] [--model-overrides model.depth=12 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.torchrun_launch import torchrun  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "sit_b2_ig.yaml")
TAG = "step_000000001"


def _cfg(stage: int, extra: list[str]):
    from igscale.config.load import load_config

    return load_config(CONFIG, [f"engine.zero_stage={stage}", "engine.precision=bf16", "train.global_batch=4",
                                "engine.tf32=false", *extra])


def worker(a) -> None:
    """Under torchrun: --mode save (build, one step, save) or load (same-size or universal), timed on rank 0."""
    import torch

    from igscale.distributed.engine import init_deepspeed_distributed
    from igscale.distributed.env import destroy_distributed, detect_env, device_for, init_distributed
    from igscale.training.build import build_engine
    from igscale.training.step import train_step

    env = init_distributed(detect_env())
    init_deepspeed_distributed()
    cfg = _cfg(a.stage, a.overrides)
    engine, _ = build_engine(cfg, world_size=env.world_size, device=device_for(env))
    t0 = time.time()
    if a.mode == "save":
        shape = tuple(engine.module.config.latent_shape)
        g = torch.Generator().manual_seed(env.rank)
        batch = {"latent": torch.randn(cfg.micro_batch(env.world_size), *shape, generator=g),
                 "label": torch.zeros(cfg.micro_batch(env.world_size), dtype=torch.long)}
        train_step(engine, [batch], cfg, rank=env.rank, world_size=env.world_size, step=0, device=device_for(env))
        engine.save(a.dir, TAG)
    elif a.mode == "load":
        engine.load(a.dir, TAG)
    else:
        engine.load(os.path.join(a.dir, TAG), "universal", universal=True)
    secs = time.time() - t0
    if env.rank == 0:
        params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
        print(json.dumps({"mode": a.mode, "seconds": secs, "params": params}), flush=True)
    destroy_distributed()


def _launch(nproc: int, *args: str) -> dict:
    out = torchrun(__file__, nproc, *args)
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="save", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("overrides", nargs="*", help="config overrides (e.g. model.depth=12)")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    from igscale.checkpoint.universal import convert
    from igscale.checkpoint.universal import folder_bytes as _size

    rows = []
    for stage in a.stages:
        with tempfile.TemporaryDirectory() as d:
            common = ["--stage", str(stage), "--dir", d, *a.overrides]
            saved = _launch(2, "--mode", "save", *common)
            same = _launch(2, "--mode", "load", *common)
            secs = convert(os.path.join(d, TAG), os.path.join(d, TAG, "universal"))
            uni = _launch(1, "--mode", "universal", *common)
            rows.append((stage, saved["params"], _size(os.path.join(d, TAG)) - _size(os.path.join(d, TAG, "universal")),
                         _size(os.path.join(d, TAG, "universal")), same["seconds"], secs, uni["seconds"]))
    print(f"{'ZeRO':>4} {'params':>11} {'tag MiB':>8} {'universal MiB':>13} {'load 2->2 s':>11} {'convert s':>9} "
          f"{'load univ. ->1 s':>16} {'convert/load':>12}")
    for st, n, tag, uni, same, conv, ul in rows:
        print(f"{st:>4} {n:>11,} {tag / 2**20:>8.0f} {uni / 2**20:>13.0f} {same:>11.1f} {conv:>9.1f} {ul:>16.1f} "
              f"{conv / max(same, 1e-9):>12.1f}")


if __name__ == "__main__":
    main()
