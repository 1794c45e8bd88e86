"""Sample one guidance setting and score it against the reference batch: the unit of `igscale sweep` and `tune`.

`GridScorer` holds what every point shares (model, decoder, sampler, Inception net, the reference batch and its
features, extracted once, and the input fingerprints) and runs one point as a collective: all ranks generate their
chunks into the point's folder, rank 0 assembles samples.npz, all ranks extract features, rank 0 computes the metrics
and writes them. A rerun finds finished chunks and stored metrics and does not redo them.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from igscale.core.typed import to_dict
from igscale.distributed.env import DistEnv, barrier, device_for
from igscale.eval.evaluate import evaluate_npz, extract_features, fetch_local
from igscale.eval.fingerprint import file_fingerprint, input_fingerprints, provenance, scoring_record
from igscale.eval.generate import SAMPLES_NPZ, GenerationConfig, assemble, describe, generate
from igscale.eval.setup import build_decoder, load_model, load_scorer, sampler_from_args
from igscale.eval.sweep import GridPoint, make_grid
from igscale.storage import open_storage

__all__ = ["GridScorer", "open_grid"]


@dataclass
class GridScorer:
    model: object
    decode: Callable
    sampler: object
    settings: dict
    """Model / decoder description (the sampling job identity's settings)."""
    inputs: dict
    """{"fingerprints": ..., "provenance": ...} on rank 0, {} elsewhere."""
    inception: object | None
    """None: the points are only sampled (`igscale sweep --no-score`)."""
    ref: str | None
    """Local path of the reference batch."""
    ref_url: str | None
    env: DistEnv
    device: object
    eval_batch_size: int = 64
    preset: str | None = None
    log: Callable[[str], None] = print
    _ref_feats: dict = field(default_factory=dict)
    _ref_fp: dict | None = None

    def score(self, pt: GridPoint, out_url: str, cfg: GenerationConfig, metrics_key: str = "metrics.json") -> dict:
        """The point's metrics row on rank 0 (read back if already stored), {} on the other ranks."""
        store = open_storage(out_url)
        if store.exists(metrics_key):  # finished in an earlier run
            return json.loads(store.get_text(metrics_key)) if self.env.is_main else {}
        self.log(f"== {pt.name} at {cfg.num_samples} samples: {pt.guidance}")
        generate(self.model, self.decode, cfg, self.sampler, pt.guidance, out_url, self.env, settings=self.settings,
                 device=self.device, log=self.log)
        barrier()
        if self.env.is_main:
            assemble(out_url, cfg, {**self.settings, **describe(cfg), "sampler": to_dict(self.sampler),
                                    "guidance": to_dict(pt.guidance), "label_protocol": cfg.labels,
                                    "preset": self.preset, **self.inputs}, log=self.log)
        barrier()
        if self.inception is None:
            return {**pt.row(), "samples": store.url(SAMPLES_NPZ)} if self.env.is_main else {}
        if not self._ref_feats:
            self._ref_feats.update(extract_features(self.ref, self.inception, self.env,
                                                    batch_size=self.eval_batch_size, device=self.device,
                                                    desc="reference"))
        row: dict = {}
        with fetch_local(store.url(SAMPLES_NPZ)) as smp:
            metrics = evaluate_npz(smp, self.ref, self.inception, self.env, batch_size=self.eval_batch_size,
                                   device=self.device, log=self.log, ref_features=self._ref_feats)
            if self.env.is_main:
                if self._ref_fp is None:
                    self._ref_fp = file_fingerprint(self.ref_url, local=self.ref)
                smp_fp = file_fingerprint(store.url(SAMPLES_NPZ), local=smp)
                record = scoring_record(self.inception, **self.inputs["fingerprints"], ref=self._ref_fp,
                                        sample=smp_fp)
                row = {**pt.row(), **metrics, **record}
                store.put_text(metrics_key, json.dumps(row, indent=2, sort_keys=True))
        barrier()
        return row


def open_grid(args, env: DistEnv, log: Callable[[str], None] = print):
    """What sweep and tune share: (sampler, grid points, GridScorer factory) for the command config `args`."""
    device = device_for(env)
    model, model_meta = load_model(args)
    sampler, base = sampler_from_args(args, model=model, guidance_overrides=False)
    grid = make_grid(base, args.w_ig, args.w_cfg, args.cfg_interval, args.ig_interval)
    decode, dec_meta = build_decoder(args, device, latent_channels=model.config.in_channels)
    inception = load_scorer(args.inception, device, args.allow_unverified_weights) if args.score else None
    # hashed once on rank 0; every point's samples.json and metrics.json carries them
    inputs = {"fingerprints": input_fingerprints(args), "provenance": provenance()} if env.is_main else {}

    def scorer(ref_local: str | None) -> GridScorer:
        return GridScorer(model, decode, sampler, {**model_meta, **dec_meta}, inputs, inception, ref_local,
                          args.ref, env, device, args.eval_batch_size, args.preset, log)

    return sampler, grid, scorer
