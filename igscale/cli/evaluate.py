r"""`igscale eval`: FID, sFID, IS, precision, recall of an ADM sample batch against an ADM reference batch.

  torchrun --nproc_per_node 8 -m igscale.cli.main eval VIRTUAL_imagenet256_labeled.npz s3://b/run/samples/samples.npz \
      --inception /weights/pt_inception-2015-12-05-6726825d.pth --out s3://b/run/samples/metrics.json
  igscale eval --make-ref my_ref.npz --images real_images.npz --inception ...   # build a reference batch

The Inception file must be the published one (its sha256 starts with the 6726825d of its name); metrics.json records
that check, the sha256 of the reference and sample batches, and the igscale version and git commit.
"""
from __future__ import annotations

import json

from igscale.cli.common import typed_main
from igscale.core.cli_args import TypedArgParser
from igscale.distributed.env import device_for
from igscale.eval.commands import EvalConfig
from igscale.eval.evaluate import evaluate_npz, fetch_local, make_reference_batch
from igscale.eval.fingerprint import file_fingerprint, scoring_record
from igscale.eval.setup import load_scorer
from igscale.storage import split_url

PROG = "igscale eval"


def build_parser() -> TypedArgParser:
    """Flags of EvalConfig (REF and SAMPLE positional); parse_args returns an EvalConfig."""
    return TypedArgParser(EvalConfig, prog=PROG, description=__doc__, positional=("ref", "sample"))


def write_json(url: str, obj) -> None:
    store, name = split_url(url)
    store.put_text(name, json.dumps(obj, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    return typed_main(PROG, build_parser, _run, argv, timeout_s=None)


def _run(args: EvalConfig, env) -> int:
    device = device_for(env)
    inception = load_scorer(args.inception, device, args.allow_unverified_weights)
    if args.make_ref:
        with fetch_local(args.images) as images:
            make_reference_batch(images, args.make_ref, inception, env, num_pr_images=args.num_pr_images,
                                 batch_size=args.batch_size, device=device)
        return 0
    with fetch_local(args.ref) as ref, fetch_local(args.sample) as sample:
        metrics = evaluate_npz(sample, ref, inception, env, batch_size=args.batch_size, device=device,
                               pr_distance_dtype=args.pr_distance_dtype)
        if metrics is not None and args.out:  # hashed from the fetched copies, before they are removed
            record = scoring_record(inception, ref=file_fingerprint(args.ref, local=ref),
                                    sample=file_fingerprint(args.sample, local=sample))
            write_json(args.out, {**metrics, "ref": args.ref, "sample": args.sample, "world_size": env.world_size,
                                  "pr_distance_dtype": args.pr_distance_dtype, **record})
    return 0
