"""`igscale sample`: distributed, resumable generation of an ADM-format sample batch.

Launch with torchrun / srun / a Ray job (each rank runs this same command), e.g.
  torchrun --nproc_per_node 8 -m igscale.cli.main sample --export s3://b/run/export --preset sit-xl2-ig-cfg-fid1.46 \
      --vae sd-vae --vae-weights /models/sd-vae-ft-ema --out s3://b/run/samples50k
"""
from __future__ import annotations

import argparse
import time

import torch

from igscale.cli.common import run_distributed
from igscale.core.typed import to_dict
from igscale.distributed.env import barrier, device_for, print0
from igscale.eval.generate import GenerationConfig, assemble, describe, generate
from igscale.eval.setup import add_model_args, add_sampler_args, build_decoder, load_model, sampler_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="igscale sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampler_args(p)
    g = p.add_argument_group("job")
    g.add_argument("--out", required=True, help="output folder or s3:// prefix (chunks/, samples.npz, samples.json)")
    g.add_argument("--num-samples", type=int, default=50_000)
    g.add_argument("--seed", type=int, default=0, help="sample i uses seed+i")
    g.add_argument("--labels", choices=["random", "balanced"], default="random")
    g.add_argument("--chunk-size", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=64,
                   help="per-rank batch; fixed per output folder unless --batch-invariant (the world size may change)")
    add_batch_mode_args(g)
    return p


def add_batch_mode_args(g) -> None:
    """Fast plain batched kernels by default; --batch-invariant opts in to batch-size-independent images."""
    g.add_argument("--batch-invariant", dest="batch_invariant", action="store_true", default=False,
                   help="per-sample GEMMs and per-image VAE decode: images bitwise independent of --batch-size too "
                        "(slower, especially on GPUs)")
    g.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                   help="plain batched kernels (the default; kept so older command lines still work)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_distributed("igscale sample", lambda env: _run(args, env), timeout_s=4 * 3600)


def _run(args, env) -> int:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # as the official samplers (fp32 model with TF32)
        torch.backends.cudnn.allow_tf32 = True
    device = device_for(env)
    cfg = GenerationConfig(num_samples=args.num_samples, seed=args.seed, labels=args.labels,
                           chunk_size=args.chunk_size, batch_size=args.batch_size,
                           batch_invariant=args.batch_invariant)
    model, model_meta = load_model(args)
    sampler, guidance = sampler_from_args(args)
    decode, dec_meta = build_decoder(args, device)
    settings = {**model_meta, **dec_meta}
    print0(f"sampling {cfg.num_samples} ({cfg.labels} labels) on {env.world_size} rank(s): {sampler} {guidance}")
    t0 = time.perf_counter()
    generate(model, decode, cfg, sampler, guidance, args.out, env, settings=settings, device=device, log=print)
    barrier()
    if env.is_main:
        meta = {**settings, **describe(cfg), "sampler": to_dict(sampler), "guidance": to_dict(guidance),
                "nfe_per_sample": sampler.nfe(), "label_protocol": cfg.labels, "world_size": env.world_size,
                "seconds_last_run": round(time.perf_counter() - t0, 3)}
        assemble(args.out, cfg, meta)
    barrier()
    return 0
