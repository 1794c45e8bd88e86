"""`igscale sweep`: one distributed job that samples and scores a grid of guidance settings with shared seeds.

  torchrun --nproc_per_node 8 -m igscale.cli.main sweep --export s3://b/run/export --preset sit-xl2-ig-cfg-fid1.46 \
      --vae sd-vae --vae-weights /models/sd-vae-ft-ema --ref VIRTUAL_imagenet256_labeled.npz \
      --inception /weights/pt_inception-2015-12-05-6726825d.pth --num-samples 10000 \
      --w-ig 1.0 1.2 1.4 1.6 --w-cfg 1.0 1.35 --cfg-interval 0,0.7 0,1 --out s3://b/run/sweep
"""
from __future__ import annotations

import argparse
import json

from igscale.cli.common import run_distributed
from igscale.cli.sample import add_batch_mode_args
from igscale.core.typed import to_dict
from igscale.distributed.env import barrier, device_for, print0
from igscale.eval.evaluate import evaluate_npz, extract_features, fetch_local
from igscale.eval.generate import SAMPLES_NPZ, GenerationConfig, assemble, describe, generate
from igscale.eval.inception import WEIGHTS_FILENAME, load_inception
from igscale.eval.npz import validate_ref_npz
from igscale.eval.setup import add_model_args, add_sampler_args, build_decoder, load_model, sampler_from_args
from igscale.eval.sweep import make_grid, write_report
from igscale.storage import open_storage


def _interval(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"interval must be LO,HI (e.g. 0,0.7), got {s!r}") from e
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="igscale sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampler_args(p, guidance=False)
    g = p.add_argument_group("grid (each axis defaults to the preset's value)")
    g.add_argument("--w-ig", type=float, nargs="+", default=[])
    g.add_argument("--w-cfg", type=float, nargs="+", default=[])
    g.add_argument("--cfg-interval", type=_interval, nargs="+", default=[], metavar="LO,HI")
    g.add_argument("--ig-interval", type=_interval, nargs="+", default=[], metavar="LO,HI")
    g = p.add_argument_group("job")
    g.add_argument("--out", required=True, help="folder or s3:// prefix; one sub-folder per grid point + the report")
    g.add_argument("--ref", required=True, help="ADM reference batch npz (path or s3://)")
    g.add_argument("--inception", required=True, help=f"path, folder or s3:// URL of {WEIGHTS_FILENAME}")
    g.add_argument("--num-samples", type=int, default=10_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--labels", choices=["random", "balanced"], default="random")
    g.add_argument("--chunk-size", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=64, help="per-rank sampling batch (see igscale sample)")
    add_batch_mode_args(g)
    g.add_argument("--eval-batch-size", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_distributed("igscale sweep", lambda env: _run(args, env), timeout_s=4 * 3600)


def _run(args, env) -> int:
    device = device_for(env)
    sampler, base = sampler_from_args(args, guidance_overrides=False)
    grid = make_grid(base, args.w_ig, args.w_cfg, args.cfg_interval, args.ig_interval)
    cfg = GenerationConfig(num_samples=args.num_samples, seed=args.seed, labels=args.labels,
                           chunk_size=args.chunk_size, batch_size=args.batch_size, batch_invariant=args.batch_invariant)
    model, model_meta = load_model(args)
    decode, dec_meta = build_decoder(args, device)
    inception = load_inception(args.inception, device)
    settings = {**model_meta, **dec_meta}
    root = open_storage(args.out)
    print0(f"sweep: {len(grid)} grid points x {cfg.num_samples} samples on {env.world_size} rank(s)")
    rows = []
    with fetch_local(args.ref) as ref:
        validate_ref_npz(ref)
        ref_feats = None  # computed once, on the first point that needs scoring
        for pt in grid:
            out = root.url(pt.name)
            point_store = open_storage(out)
            if point_store.exists("metrics.json"):  # finished in an earlier run of this sweep
                rows.append(json.loads(point_store.get_text("metrics.json")))
                continue
            print0(f"== {pt.name}: {pt.guidance}")
            generate(model, decode, cfg, sampler, pt.guidance, out, env, settings=settings, device=device, log=print0)
            barrier()
            if env.is_main:
                assemble(out, cfg, {**settings, **describe(cfg), "sampler": to_dict(sampler),
                                    "guidance": to_dict(pt.guidance), "label_protocol": cfg.labels}, log=print0)
            barrier()
            if ref_feats is None:
                ref_feats = extract_features(ref, inception, env, batch_size=args.eval_batch_size, device=device,
                                             desc="reference")
            with fetch_local(point_store.url(SAMPLES_NPZ)) as smp:
                metrics = evaluate_npz(smp, ref, inception, env, batch_size=args.eval_batch_size, device=device,
                                       log=print0, ref_features=ref_feats)
            if env.is_main:
                row = {**pt.row(), **metrics}
                point_store.put_text("metrics.json", json.dumps(row, indent=2, sort_keys=True))
                rows.append(row)
            barrier()
    if env.is_main:
        write_report(args.out, rows, {"num_samples": cfg.num_samples, "seed": cfg.seed, "label_protocol": cfg.labels,
                                      "sampler": to_dict(sampler), "ref": args.ref, **settings})
        print0(f"wrote {root.url('sweep.md')}, sweep.csv, sweep.json, sweep.png")
    return 0
