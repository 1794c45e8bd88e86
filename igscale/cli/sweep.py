r"""`igscale sweep`: one distributed job that samples and scores a grid of guidance settings with shared seeds.

  torchrun --nproc_per_node 8 -m igscale.cli.main sweep --export s3://b/run/export --preset sit-xl2-ig-cfg-fid1.46 \
      --vae-weights /models/sd-vae-ft-ema --ref VIRTUAL_imagenet256_labeled.npz \
      --inception /weights/pt_inception-2015-12-05-6726825d.pth --num-samples 10000 \
      --w-ig 1.0 1.2 1.4 1.6 --w-cfg 1.0 1.35 --cfg-interval 0,0.7 0,1 --out s3://b/run/sweep
"""
from __future__ import annotations

from contextlib import nullcontext

from igscale.cli.common import typed_main
from igscale.core.cli_args import TypedArgParser
from igscale.core.typed import to_dict
from igscale.distributed.env import print0
from igscale.eval.commands import SweepConfig, show_presets
from igscale.eval.evaluate import fetch_local
from igscale.eval.npz import validate_ref_npz
from igscale.eval.point import open_grid
from igscale.eval.sweep import write_report
from igscale.storage import open_storage

PROG = "igscale sweep"


def build_parser() -> TypedArgParser:
    """Flags of SweepConfig; parse_args returns a SweepConfig."""
    return show_presets(TypedArgParser(SweepConfig, prog=PROG, description=__doc__))


def main(argv: list[str] | None = None) -> int:
    return typed_main(PROG, build_parser, _run, argv)


def _run(args: SweepConfig, env) -> int:
    sampler, grid, scorer = open_grid(args, env, print0)
    cfg = args.generation()
    root = open_storage(args.out)
    print0(f"sweep: {len(grid)} grid points x {cfg.num_samples} samples on {env.world_size} rank(s)")
    rows = []
    with fetch_local(args.ref) if args.score else nullcontext() as ref:
        if ref is not None:
            validate_ref_npz(ref)
        points = scorer(ref)
        for pt in grid:
            row = points.score(pt, root.url(pt.name), cfg)
            if env.is_main:
                rows.append(_report_row(row))
    if env.is_main:
        write_report(args.out, rows, {"num_samples": cfg.num_samples, "seed": cfg.seed, "label_protocol": cfg.labels,
                                      "sampler": to_dict(sampler), "ref": args.ref, "preset": args.preset,
                                      "scored": args.score, **points.settings, **points.inputs})
        print0(f"wrote {root.url('sweep.md')}, sweep.csv, sweep.json" + (", sweep.png" if args.score else ""))
    return 0


def _report_row(row: dict) -> dict:
    """A point's metrics without its fingerprints (the report states the shared inputs once, in its meta)."""
    return {k: v for k, v in row.items() if k not in ("fingerprints", "provenance")}
