r"""`igscale reproduce`: sample and score a published IG number from the released weights, in one command.

  torchrun --nproc_per_node 8 -m igscale.cli.main reproduce --preset sit-xl2-ig-cfg-fid1.46 \
      --checkpoint /weights/SiT-XL-2-IG.pt --vae-weights /weights/sd-vae-ft-ema \
      --inception /weights/pt_inception-2015-12-05-6726825d.pth --ref /data/VIRTUAL_imagenet256_labeled.npz \
      --out s3://b/reproduce/sit-xl2-ig-cfg

The preset fixes the model, checkpoint kind, VAE, pixel quantisation, label protocol, sampler and guidance; a flag
that contradicts it is refused. Sampling is sharded and resumable exactly as in `igscale sample` (after a crash or
preemption, rerun the same command), then the samples are scored as `igscale eval` scores them. --out receives
samples.npz, samples.json and metrics.json (the measured metrics next to the published FID, and the sha256 of every
input file). The published numbers are 50,000-sample FIDs: fewer samples read higher.
"""
from __future__ import annotations

import json
import time

from igscale.cli.common import typed_main
from igscale.core.cli_args import TypedArgParser
from igscale.diffusion.presets import find_preset
from igscale.distributed.env import barrier, device_for, print0
from igscale.eval.commands import ReproduceConfig, show_presets
from igscale.eval.evaluate import evaluate_npz, fetch_local
from igscale.eval.fingerprint import file_fingerprint, input_fingerprints, samples_meta, scoring_record
from igscale.eval.generate import SAMPLES_NPZ, assemble, generate
from igscale.eval.npz import validate_ref_npz
from igscale.eval.setup import build_decoder, load_model, load_scorer, sampler_from_args, sampling_precision
from igscale.storage import open_storage

PROG = "igscale reproduce"
PROTOCOL_SAMPLES = 50_000  # every published number is an FID-50K


def build_parser() -> TypedArgParser:
    """Flags of ReproduceConfig; parse_args returns a ReproduceConfig (identity flags resolved from the preset)."""
    return show_presets(TypedArgParser(ReproduceConfig, prog=PROG, description=__doc__))


def main(argv: list[str] | None = None) -> int:
    return typed_main(PROG, build_parser, _run, argv)


def _run(args: ReproduceConfig, env) -> int:
    sampling_precision()
    device = device_for(env)
    preset = find_preset(args.preset)
    cfg = args.generation()
    # the scorer and the reference first: a wrong Inception file or reference batch fails now, not after sampling
    inception = load_scorer(args.inception, device, args.allow_unverified_weights)
    with fetch_local(args.ref) as ref:
        validate_ref_npz(ref)
        model, model_meta = load_model(args)
        sampler, guidance = sampler_from_args(args, model=model)
        decode, dec_meta = build_decoder(args, device, latent_channels=model.config.in_channels)
        settings = {**model_meta, **dec_meta}
        print0(f"reproduce {args.preset} ({preset.description}): {cfg.num_samples} samples, {cfg.labels} labels, "
               f"{env.world_size} rank(s)")
        if cfg.num_samples != PROTOCOL_SAMPLES:
            print0(f"note: the published FID uses {PROTOCOL_SAMPLES} samples; {cfg.num_samples} give a higher FID")
        t0 = time.perf_counter()
        generate(model, decode, cfg, sampler, guidance, args.out, env, settings=settings, device=device, log=print0)
        del model
        barrier()
        inputs = input_fingerprints(args) if env.is_main else {}
        if env.is_main:
            assemble(args.out, cfg, samples_meta(args, settings, cfg, sampler, guidance, world_size=env.world_size,
                                                 seconds=time.perf_counter() - t0, fingerprints=inputs), log=print0)
        barrier()
        samples = open_storage(args.out).url(SAMPLES_NPZ)
        with fetch_local(samples) as smp:
            metrics = evaluate_npz(smp, ref, inception, env, batch_size=args.eval_batch_size, device=device,
                                   log=print0)
            if env.is_main:
                record = scoring_record(inception, **inputs, ref=file_fingerprint(args.ref, local=ref),
                                        sample=file_fingerprint(samples, local=smp))
                _write_metrics(args, preset, metrics, record, env.world_size)
    barrier()
    return 0


def _write_metrics(args: ReproduceConfig, preset, metrics: dict, record: dict, world_size: int) -> None:
    out = {**metrics, **record, "preset": args.preset, "description": preset.description,
           "expected_fid": preset.expected_fid, "label_protocol": args.labels, "ref": args.ref,
           "sample": open_storage(args.out).url(SAMPLES_NPZ), "world_size": world_size,
           "pr_distance_dtype": "float32", "protocol_samples": PROTOCOL_SAMPLES}
    open_storage(args.out).put_text("metrics.json", json.dumps(out, indent=2, sort_keys=True))
    published = f"published {preset.expected_fid}" if preset.expected_fid is not None else "no published FID"
    caveat = "" if record["inception_verified"] else " (UNVERIFIED Inception weights: not comparable)"
    print0(f"{args.preset}: FID {metrics['fid']:.3f} ({published}, FID-{PROTOCOL_SAMPLES // 1000}K){caveat}; "
           f"wrote {open_storage(args.out).url('metrics.json')}")
