r"""`igscale sample`: distributed, resumable generation of an ADM-format sample batch.

Launch with torchrun / srun / a Ray job (each rank runs this same command), e.g.
  torchrun --nproc_per_node 8 -m igscale.cli.main sample --export s3://b/run/export --preset sit-xl2-ig-cfg-fid1.46 \
      --vae-weights /models/sd-vae-ft-ema --out s3://b/run/samples50k

A --preset also sets the VAE, quantisation, label protocol and (for --checkpoint) the model and checkpoint kind;
giving one of those flags with another value is an error. Sampler and guidance flags override the preset's.
"""
from __future__ import annotations

import time

from igscale.cli.common import typed_main
from igscale.core.cli_args import TypedArgParser
from igscale.distributed.env import barrier, device_for, print0
from igscale.eval.commands import SampleConfig, show_presets
from igscale.eval.fingerprint import samples_meta
from igscale.eval.generate import assemble, generate
from igscale.eval.setup import build_decoder, load_model, sampler_from_args, sampling_precision

PROG = "igscale sample"


def build_parser() -> TypedArgParser:
    """Flags of SampleConfig; parse_args returns a SampleConfig."""
    return show_presets(TypedArgParser(SampleConfig, prog=PROG, description=__doc__))


def main(argv: list[str] | None = None) -> int:
    return typed_main(PROG, build_parser, _run, argv)


def _run(args: SampleConfig, env) -> int:
    sampling_precision()
    device = device_for(env)
    cfg = args.generation()
    model, model_meta = load_model(args)
    sampler, guidance = sampler_from_args(args, model=model)
    decode, dec_meta = build_decoder(args, device, latent_channels=model.config.in_channels)
    settings = {**model_meta, **dec_meta}
    print0(f"sampling {cfg.num_samples} ({cfg.labels} labels) on {env.world_size} rank(s): {sampler} {guidance}")
    t0 = time.perf_counter()
    generate(model, decode, cfg, sampler, guidance, args.out, env, settings=settings, device=device, log=print)
    barrier()
    if env.is_main:
        assemble(args.out, cfg, samples_meta(args, settings, cfg, sampler, guidance, world_size=env.world_size,
                                             seconds=time.perf_counter() - t0))
    barrier()
    return 0
