r"""`igscale sweep`: one distributed job that samples and scores a grid of guidance settings with shared seeds.

  torchrun --nproc_per_node 8 -m igscale.cli.main sweep --export s3://b/run/export --preset sit-xl2-ig-cfg-fid1.46 \
      --vae sd-vae --vae-weights /models/sd-vae-ft-ema --ref VIRTUAL_imagenet256_labeled.npz \
      --inception /weights/pt_inception-2015-12-05-6726825d.pth --num-samples 10000 \
      --w-ig 1.0 1.2 1.4 1.6 --w-cfg 1.0 1.35 --cfg-interval 0,0.7 0,1 --out s3://b/run/sweep
"""
from __future__ import annotations

import json

from igscale.cli.common import run_distributed
from igscale.core.cli_args import TypedArgParser, cli_error
from igscale.core.typed import ConfigError, to_dict
from igscale.distributed.env import barrier, device_for, print0
from igscale.eval.commands import SweepConfig
from igscale.eval.evaluate import evaluate_npz, extract_features, fetch_local
from igscale.eval.generate import SAMPLES_NPZ, assemble, describe, generate
from igscale.eval.inception import load_inception
from igscale.eval.npz import validate_ref_npz
from igscale.eval.setup import build_decoder, load_model, sampler_from_args
from igscale.eval.sweep import make_grid, write_report
from igscale.storage import open_storage

PROG = "igscale sweep"


def build_parser() -> TypedArgParser:
    """Flags of SweepConfig; parse_args returns a SweepConfig."""
    return TypedArgParser(SweepConfig, prog=PROG, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as e:
        return cli_error(PROG, e)
    return run_distributed(PROG, lambda env: _run(args, env), timeout_s=4 * 3600)


def _run(args: SweepConfig, env) -> int:
    device = device_for(env)
    sampler, base = sampler_from_args(args, guidance_overrides=False)
    grid = make_grid(base, args.w_ig, args.w_cfg, args.cfg_interval, args.ig_interval)
    cfg = args.generation()
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
