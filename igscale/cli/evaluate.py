"""`igscale eval`: FID, sFID, IS, precision, recall of an ADM sample batch against an ADM reference batch.

  torchrun --nproc_per_node 8 -m igscale.cli.main eval VIRTUAL_imagenet256_labeled.npz s3://b/run/samples/samples.npz \
      --inception /weights/pt_inception-2015-12-05-6726825d.pth --out s3://b/run/samples/metrics.json
  igscale eval --make-ref my_ref.npz --images real_images.npz --inception ...   # build a reference batch
"""
from __future__ import annotations

import argparse
import json

from igscale.cli.common import run_distributed
from igscale.distributed.env import device_for
from igscale.eval.evaluate import evaluate_npz, fetch_local, make_reference_batch
from igscale.eval.inception import WEIGHTS_FILENAME, load_inception
from igscale.storage import split_url


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="igscale eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", nargs="?", help="reference batch npz (mu, sigma, mu_s, sigma_s, arr_0); path or s3://")
    p.add_argument("sample", nargs="?", help="sample batch npz (arr_0 uint8 NHWC); path or s3://")
    p.add_argument("--inception", required=True, help=f"path, folder or s3:// URL of {WEIGHTS_FILENAME}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="write the metrics JSON here (path or s3://)")
    p.add_argument("--make-ref", metavar="OUT_NPZ", help="instead: build a reference batch from --images")
    p.add_argument("--images", help="npz of real images (arr_0 uint8 NHWC) for --make-ref")
    p.add_argument("--num-pr-images", type=int, default=10_000)
    return p


def write_json(url: str, obj) -> None:
    store, name = split_url(url)
    store.put_text(name, json.dumps(obj, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.make_ref and not (args.ref and args.sample):
        p.error("give REF and SAMPLE, or --make-ref OUT --images NPZ")
    if args.make_ref and not args.images:
        p.error("--make-ref needs --images")
    return run_distributed("igscale eval", lambda env: _run(args, env))


def _run(args, env) -> int:
    device = device_for(env)
    inception = load_inception(args.inception, device)
    if args.make_ref:
        with fetch_local(args.images) as images:
            make_reference_batch(images, args.make_ref, inception, env, num_pr_images=args.num_pr_images,
                                 batch_size=args.batch_size, device=device)
        return 0
    with fetch_local(args.ref) as ref, fetch_local(args.sample) as sample:
        metrics = evaluate_npz(sample, ref, inception, env, batch_size=args.batch_size, device=device)
    if metrics is not None and args.out:
        write_json(args.out, {**metrics, "ref": args.ref, "sample": args.sample, "world_size": env.world_size})
    return 0
