r"""`igscale tune`: search a guidance grid by successive halving, at a fraction of the full grid's samples.

  torchrun --nproc_per_node 8 -m igscale.cli.main tune --export s3://b/run/export --preset sit-xl2-ig-cfg-fid1.46 \
      --vae-weights /models/sd-vae-ft-ema --ref VIRTUAL_imagenet256_labeled.npz \
      --inception /weights/pt_inception-2015-12-05-6726825d.pth --num-samples 10000 --start-samples 1250 \
      --w-ig 1.0 1.2 1.4 1.6 --w-cfg 1.0 1.25 1.35 1.5 --out s3://b/run/tune

Every candidate is scored on the first --start-samples samples of the shared seeds; the best --keep fraction is
scored again on twice as many, until the survivors are scored at --num-samples. Each candidate has one sampling
folder that only grows (its smaller sample sets are prefixes of the larger), and every (candidate, count) score is
stored, so a rerun of the same command resumes where it stopped. Writes tune.md and tune.json under --out.
"""
from __future__ import annotations

import dataclasses
import json

from igscale.cli.common import typed_main
from igscale.core.cli_args import TypedArgParser
from igscale.core.typed import to_dict
from igscale.distributed.env import print0
from igscale.eval.commands import TuneConfig, show_presets
from igscale.eval.evaluate import fetch_local
from igscale.eval.npz import validate_ref_npz
from igscale.eval.point import open_grid
from igscale.eval.tune import format_report, grid_cost, successive_halving
from igscale.storage import open_storage

PROG = "igscale tune"


def build_parser() -> TypedArgParser:
    """Flags of TuneConfig; parse_args returns a TuneConfig."""
    return show_presets(TypedArgParser(TuneConfig, prog=PROG, description=__doc__))


def main(argv: list[str] | None = None) -> int:
    return typed_main(PROG, build_parser, _run, argv)


def _run(args: TuneConfig, env) -> int:
    sampler, grid, scorer = open_grid(args, env, print0)
    root = open_storage(args.out)
    print0(f"tune: {len(grid)} candidates, {args.start_samples} -> {args.num_samples} samples, keep {args.keep:g}, "
           f"on {env.world_size} rank(s)")
    with fetch_local(args.ref) as ref:
        validate_ref_npz(ref)
        points = scorer(ref)

        def score(i: int, pt, n: int) -> float:
            cfg = dataclasses.replace(args.generation(), num_samples=n)  # one folder per candidate, grown per rung
            row = points.score(pt, root.url(pt.name), cfg, metrics_key=f"metrics_{n:09d}.json")
            fid = [float(row["fid"]) if env.is_main else 0.0]
            _broadcast(fid)  # every rank must take the same survivors
            return fid[0]

        res = successive_halving(grid, score, start=args.start_samples, full=args.num_samples, keep=args.keep,
                                 log=print0)
    if env.is_main:
        names = [f"{pt.name} (w_ig={pt.guidance.w_ig:g}, w_cfg={pt.guidance.w_cfg:g}, cfg[{pt.row()['cfg_interval']}]"
                 f", ig[{pt.row()['ig_interval']}])" for pt in grid]
        best, grid_n = grid[res.best], grid_cost(len(grid), args.num_samples)
        root.put_text("tune.md", "# Guidance tuning (successive halving)\n\n" + format_report(res, names,
                                                                                              args.num_samples))
        root.put_text("tune.json", json.dumps({
            "best": {"point": best.name, "guidance": to_dict(best.guidance)},
            "scores": {grid[i].name: {str(n): f for n, f in s.items()} for i, s in res.scores.items()},
            "rungs": [[grid[i].name for i in m] for m in res.rung_members],
            "samples_generated": res.samples_generated, "samples_scored": res.samples_scored,
            "grid_samples": grid_n, "sampler": to_dict(sampler), "preset": args.preset,
            **points.settings, **points.inputs,
        }, indent=2, sort_keys=True))
        print0(f"tune: best {best.name} {best.guidance}; generated {res.samples_generated} samples "
               f"({res.samples_generated / grid_n:.0%} of the full grid); wrote {root.url('tune.md')}, tune.json")
    return 0


def _broadcast(values: list[float]) -> None:
    """Rank 0's FID to every rank (scores decide which candidates the next rung samples)."""
    import torch

    from igscale.distributed.collectives import all_reduce

    t = torch.tensor(values, dtype=torch.float64)
    out = all_reduce(t)  # only rank 0 contributes a non-zero value
    values[:] = [float(v) for v in out]
