"""Trainer overhead: img/s of igscale's DeepSpeed ZeRO-2 step on 2 processes vs a plain single-process torch loop.

Same tiny SiT+IG model, same global batch, same loss (IG loss), AdamW, clipping 1.0 and an fp32 EMA in both; data
are in-memory latents so only the training step is measured. The plain loop gets all CPU threads; each of the 2
DeepSpeed ranks gets an equal share. Both are measured in this one run and printed side by side; each figure is the
best of several timing windows, which damps interference from other jobs on a shared machine.

    python bench/bench_train_overhead.py [--steps 60] [--global-batch 32] [--hidden 64] [--depth 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(a):
    from igscale.models import build_model

    torch.manual_seed(0)
    return build_model("SiT-S/2", input_size=8, in_channels=4, hidden_size=a.hidden, depth=a.depth, num_heads=2,
                       num_classes=10, ig_layers=(2,))


def _data(n, bs, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 4, 8, 8, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def plain(a, threads: int) -> float:
    from igscale.diffusion.losses import ig_loss

    torch.set_num_threads(threads)
    model = _model(a)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = _data(a.steps + a.warmup, a.global_batch, 0)
    best, t0 = 0.0, None
    for i, (x, y) in enumerate(data):
        if i >= a.warmup and (i - a.warmup) % a.window == 0:
            if t0 is not None:
                best = max(best, a.window * a.global_batch / (time.perf_counter() - t0))
            t0 = time.perf_counter()
        g = torch.Generator().manual_seed(i)
        loss = ig_loss(model, x, y, torch.rand(len(x), generator=g), torch.randn(x.shape, generator=g))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                ema[n].lerp_(p, 1e-4)
    return max(best, a.window * a.global_batch / (time.perf_counter() - t0))


def worker(a) -> None:
    """One DeepSpeed rank (run under torchrun): igscale's engine + train_step + EMA, as in the trainer."""
    from igscale.config.load import load_config
    from igscale.distributed.engine import DeepSpeedEngine, init_deepspeed_distributed
    from igscale.distributed.env import destroy_distributed, detect_env, init_distributed
    from igscale.training.ema import EMA
    from igscale.training.step import train_step

    env = init_distributed(detect_env())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
    init_deepspeed_distributed()
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
                      [f"train.global_batch={a.global_batch}", "engine.zero_stage=2", "engine.precision=fp32",
                       "optim.lr=1e-4", "data.manifest_url=bench"])
    eng = DeepSpeedEngine(_model(a), cfg, world_size=env.world_size)
    ema = EMA(eng.param_views(), 0.9999)
    mb = cfg.micro_batch(env.world_size)
    data = _data(a.steps + a.warmup, mb, 1 + env.rank)
    best, t0 = 0.0, None
    for i, (x, y) in enumerate(data):
        if i >= a.warmup and (i - a.warmup) % a.window == 0:
            torch.distributed.barrier()
            if t0 is not None:
                best = max(best, a.window * a.global_batch / (time.perf_counter() - t0))
            t0 = time.perf_counter()
        train_step(eng, [{"latent": x, "label": y}], cfg, rank=env.rank, world_size=env.world_size, step=i,
                   device=torch.device("cpu"))
        ema.update(eng.param_views())
    torch.distributed.barrier()
    best = max(best, a.window * a.global_batch / (time.perf_counter() - t0))
    if env.rank == 0:
        with open(a.out, "w") as f:
            json.dump({"img_per_s": best}, f)
    destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60, help="timed steps, split into windows")
    p.add_argument("--window", type=int, default=20, help="steps per timing window; the best window counts")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    # The plain loop is timed with 1 thread and with all threads, before and after the DeepSpeed run (the machine
    # is shared), and its best figure is the baseline.
    ncpu = os.cpu_count() or 1
    plain_runs = {f"{t} thread(s)": plain(a, t) for t in sorted({1, ncpu})}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ds.json")
        env = dict(os.environ, TMPDIR=tmp, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29655",
               os.path.abspath(__file__), "--worker", "--out", out, "--steps", str(a.steps), "--warmup",
               str(a.warmup), "--window", str(a.window), "--global-batch", str(a.global_batch), "--hidden",
               str(a.hidden), "--depth", str(a.depth)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ds = json.load(open(out))["img_per_s"]
    for t in sorted({1, ncpu}):
        plain_runs[f"{t} thread(s)"] = max(plain_runs[f"{t} thread(s)"], plain(a, t))
    base = max(plain_runs.values())
    print(f"model: SiT+IG hidden {a.hidden}, depth {a.depth}, 8x8x4 latents; global batch {a.global_batch}; "
          f"{a.steps} timed steps, best {a.window}-step window; {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    for k, v in plain_runs.items():
        print(f"{'plain torch, 1 process, ' + k:<34}{v:10.1f} img/s")
    print(f"{'igscale DeepSpeed ZeRO-2, 2 ranks':<34}{ds:10.1f} img/s")
    print(f"ratio DeepSpeed/plain (best plain): {ds / base:.2f}")


if __name__ == "__main__":
    main()
