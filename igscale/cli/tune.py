r"""`igscale tune`: search a guidance grid by successive halving, at a fraction of the full grid's samples.

  torchrun --nproc_per_node 8 -m igscale.cli.main tune --export s3://b/run/export --preset sit-xl2-ig-cfg-fid1.46 \
      --vae sd-vae --vae-weights /models/sd-vae-ft-ema --ref VIRTUAL_imagenet256_labeled.npz \
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

from igscale.cli.common import run_distributed
from igscale.core.cli_args import TypedArgParser, cli_error
from igscale.core.typed import ConfigError, to_dict
from igscale.distributed.env import barrier, device_for, print0
from igscale.eval.commands import TuneConfig
from igscale.eval.evaluate import evaluate_npz, extract_features, fetch_local
from igscale.eval.generate import SAMPLES_NPZ, assemble, describe, generate
from igscale.eval.inception import load_inception
from igscale.eval.npz import validate_ref_npz
from igscale.eval.setup import build_decoder, load_model, sampler_from_args
from igscale.eval.sweep import make_grid
from igscale.eval.tune import format_report, grid_cost, successive_halving
from igscale.storage import open_storage

PROG = "igscale tune"


def build_parser() -> TypedArgParser:
    """Flags of TuneConfig; parse_args returns a TuneConfig."""
    return TypedArgParser(TuneConfig, prog=PROG, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as e:
        return cli_error(PROG, e)
    return run_distributed(PROG, lambda env: _run(args, env), timeout_s=4 * 3600)


def _run(args: TuneConfig, env) -> int:
    device = device_for(env)
    sampler, base = sampler_from_args(args, guidance_overrides=False)
    grid = make_grid(base, args.w_ig, args.w_cfg, args.cfg_interval, args.ig_interval)
    model, model_meta = load_model(args)
    decode, dec_meta = build_decoder(args, device)
    inception = load_inception(args.inception, device, allow_unverified=args.allow_unverified_weights)
    settings = {**model_meta, **dec_meta}
    root = open_storage(args.out)
    print0(f"tune: {len(grid)} candidates, {args.start_samples} -> {args.num_samples} samples, keep {args.keep:g}, "
           f"on {env.world_size} rank(s)")
    with fetch_local(args.ref) as ref:
        validate_ref_npz(ref)
        ref_feats: dict = {}  # the reference features, extracted once on the first score that needs them

        def score(i: int, pt, n: int) -> float:
            store = open_storage(root.url(pt.name))
            key = f"metrics_{n:09d}.json"
            if store.exists(key):  # scored in an earlier run of this search
                return float(json.loads(store.get_text(key))["fid"])
            cfg = dataclasses.replace(args.generation(), num_samples=n)
            print0(f"== {pt.name} at {n} samples: {pt.guidance}")
            generate(model, decode, cfg, sampler, pt.guidance, store.url(), env, settings=settings, device=device,
                     log=print0)
            barrier()
            if env.is_main:
                assemble(store.url(), cfg, {**settings, **describe(cfg), "sampler": to_dict(sampler),
                                            "guidance": to_dict(pt.guidance), "label_protocol": cfg.labels},
                         log=print0)
            barrier()
            if not ref_feats:
                ref_feats.update(extract_features(ref, inception, env, batch_size=args.eval_batch_size,
                                                  device=device, desc="reference"))
            with fetch_local(store.url(SAMPLES_NPZ)) as smp:
                metrics = evaluate_npz(smp, ref, inception, env, batch_size=args.eval_batch_size, device=device,
                                       log=print0, ref_features=ref_feats)
            fid = [float(metrics["fid"]) if env.is_main else 0.0]
            if env.is_main:
                store.put_text(key, json.dumps({**pt.row(), **metrics}, indent=2, sort_keys=True))
            _broadcast(fid)  # every rank must take the same survivors
            barrier()
            return fid[0]

        res = successive_halving(grid, score, start=args.start_samples, full=args.num_samples, keep=args.keep,
                                 log=print0)
    if env.is_main:
        names = [f"{pt.name} (w_ig={pt.guidance.w_ig:g}, w_cfg={pt.guidance.w_cfg:g}, cfg[{pt.row()['cfg_interval']}]"
                 f", ig[{pt.row()['ig_interval']}])" for pt in grid]
        best = grid[res.best]
        root.put_text("tune.md", "# Guidance tuning (successive halving)\n\n" + format_report(res, names,
                                                                                              args.num_samples))
        root.put_text("tune.json", json.dumps({
            "best": {"point": best.name, "guidance": to_dict(best.guidance)},
            "scores": {grid[i].name: {str(n): f for n, f in s.items()} for i, s in res.scores.items()},
            "rungs": [[grid[i].name for i in m] for m in res.rung_members],
            "samples_generated": res.samples_generated, "samples_scored": res.samples_scored,
            "grid_samples": grid_cost(len(grid), args.num_samples), "sampler": to_dict(sampler), **settings,
        }, indent=2, sort_keys=True))
        print0(f"tune: best {best.name} {best.guidance}; generated {res.samples_generated} samples "
               f"({res.samples_generated / grid_cost(len(grid), args.num_samples):.0%} of the full grid); "
               f"wrote {root.url('tune.md')}, tune.json")
    return 0


def _broadcast(values: list[float]) -> None:
    """Rank 0's FID to every rank (scores decide which candidates the next rung samples)."""
    import torch

    from igscale.distributed.collectives import all_reduce

    t = torch.tensor(values, dtype=torch.float64)
    out = all_reduce(t)  # only rank 0 contributes a non-zero value
    values[:] = [float(v) for v in out]
