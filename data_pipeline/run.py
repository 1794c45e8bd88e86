r"""Precompute VAE latents of an ImageNet-style tree into WebDataset shards + manifest.

    python -m data_pipeline.run --input s3://bkt/imagenet/train --output s3://bkt/latents/sd256 \
        --vae-kind sd-vae --vae-weights s3://bkt/weights/sd-vae-ft-ema --resolution 256 --mode mean_std
    ray job submit --address http://HEAD:8265 -- python -m data_pipeline.run ...   (same flags)

Options may also come from a JSON/YAML file (--config), flags override it. `--executor inline` runs without Ray.
`igscale precompute` is the same command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from data_pipeline.plan import ConfigError, PrecomputeConfig, fingerprint, list_images, samples_per_shard, shard_plan
from data_pipeline.write import run_shard
from igscale.core.cli_args import TypedArgParser, cli_error
from igscale.latents.format import FIELDS, FORMAT, MANIFEST
from igscale.storage import open_storage

log = logging.getLogger("data_pipeline")


def _probe_vae(cfg: PrecomputeConfig) -> tuple[dict, tuple]:
    """Load the VAE once on the driver before any work: bad weights/layout fail here, and the latent shape is known."""
    import torch

    from igscale.vae import build_vae

    vae = build_vae(cfg.vae_kind, cfg.vae_weights)
    with torch.no_grad():
        x = torch.zeros(1, 3, cfg.resolution, cfg.resolution)
        shape = tuple(vae.encode(x).latent_dist.mean.shape[1:])
    info = dict(vae.igscale_info)
    info["scaling_factor"] = float(vae.config.scaling_factor)
    return info, shape


class _Progress:
    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", desc="encode", dynamic_ncols=True, mininterval=1.0,
                        file=sys.stderr)

    def __call__(self, n: int) -> None:
        self.bar.update(n)


def _run_inline(cfg, tasks, fp, total) -> list[dict]:
    prog = _Progress(total)
    out = [run_shard(cfg.to_dict(), *t, fp, progress=prog) for t in tasks]
    prog.bar.close()
    return out


def _run_ray(cfg, tasks, fp, total, address: str | None) -> list[dict]:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
    res = ray.cluster_resources()
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)

    @ray.remote
    class Counter:  # workers report images done; the driver turns it into a progress bar with img/s
        def __init__(self):
            self.n = 0

        def add(self, n):
            self.n += n

        def get(self):
            return self.n

    counter = Counter.options(num_cpus=0).remote()

    def task(cfg_dict, shard, indices, files, labels, fp):
        import torch

        torch.set_num_threads(max(1, int(cfg_dict["cpus_per_worker"])))
        return run_shard(cfg_dict, shard, indices, files, labels, fp, progress=lambda n: counter.add.remote(n))

    remote = ray.remote(task).options(num_cpus=cfg.cpus_per_worker, num_gpus=gpus, max_retries=cfg.max_retries,
                                      retry_exceptions=False)
    limit = cfg.max_workers or max(1, int(res.get("GPU", 0) // gpus if gpus else res.get("CPU", 1)
                                          // max(cfg.cpus_per_worker, 1e-3)))
    pending, todo, results, prog, seen = [], list(tasks), {}, _Progress(total), 0
    cfg_ref = cfg.to_dict()
    while todo or pending:
        while todo and len(pending) < limit:
            t = todo.pop(0)
            pending.append(remote.remote(cfg_ref, *t, fp))
        done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        for ref in done:
            rec = ray.get(ref)  # raises (e.g. CorruptImageError in abort mode) -> the job fails, no manifest
            results[rec["shard"]] = rec
        n = ray.get(counter.get.remote())
        prog(n - seen)  # a retried shard counts its images again; the bar shows work done, not unique images
        seen = n
    prog.bar.close()
    return [results[t[0]] for t in tasks]


def build_manifest(cfg, src, vae_info, latent_shape, per_shard, records, out) -> dict:
    n = sum(r["stats"]["n"] for r in records)
    s = np.sum([r["stats"]["sum"] for r in records if r["stats"]["sum"]], axis=0)
    sq = np.sum([r["stats"]["sumsq"] for r in records if r["stats"]["sumsq"]], axis=0)
    mean = s / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_samples": sum(r["count"] for r in records),
        "source": {"url": cfg.input, "num_images": len(src.files), "num_classes": len(src.classes),
                   "classes": src.classes},
        "corrupt": [c for r in records for c in r["corrupt"]],
        "vae": {k: vae_info[k] for k in ("kind", "weights", "weights_sha256", "scaling_factor", "config")},
        "crop": "adm-center", "resolution": cfg.resolution, "mode": cfg.mode, "fields": list(FIELDS[cfg.mode]),
        "latent": {"shape": list(latent_shape), "dtype": cfg.dtype},
        "latent_stats": {"mean": mean.tolist(), "std": std.tolist(),
                         "over": "posterior samples (Var(mean)+E[std^2])" if cfg.mode == "mean_std"
                         else "stored unflipped samples"},
        "samples_per_shard": per_shard, "shard_order": cfg.shard_order,
        "shards": [{"key": r["key"], "url": out.url(r["key"]), "count": r["count"], "sha256": r["sha256"],
                    "size": r["size"], "first_index": r["first_index"], "last_index": r["last_index"]}
                   for r in records],
        "config": cfg.to_dict(),
    }


def precompute(cfg: PrecomputeConfig, *, executor: str = "ray", ray_address: str | None = None) -> dict:
    """Run the job; returns {"manifest": ..., "written": [shard ids], "skipped": [shard ids]}."""
    out = open_storage(cfg.output, endpoint_url=cfg.endpoint_url)
    out.check()  # missing credentials / bucket fail here, before any work
    src = list_images(cfg.input, cfg.endpoint_url)
    vae_info, latent_shape = _probe_vae(cfg)
    per_shard = samples_per_shard(cfg, latent_shape)
    fp = fingerprint(cfg, src, vae_info["weights_sha256"], per_shard)
    tasks = [(k, ix, [src.files[i] for i in ix], [src.labels[i] for i in ix])
             for k, ix in enumerate(shard_plan(len(src.files), per_shard, cfg.shard_order, cfg.seed))]
    log.info("%d images, %d classes -> %d shards of %d (%s order)", len(src.files), len(src.classes), len(tasks),
             per_shard, cfg.shard_order)
    if executor == "inline":
        records = _run_inline(cfg, tasks, fp, len(src.files))
    else:
        records = _run_ray(cfg, tasks, fp, len(src.files), ray_address)
    # Exactly once: one record per planned shard, counts add up to the inputs minus the corrupt ones.
    # (raised, not asserted: `python -O` strips asserts, and a manifest over a wrong shard set is silent data loss)
    got = [r["shard"] for r in records]
    if got != list(range(len(tasks))):
        missing = sorted(set(range(len(tasks))) - set(got))
        raise RuntimeError(f"precompute: shard records {got[:10]}... do not match the plan of {len(tasks)} shards "
                           f"(missing {missing[:10]}); the manifest was not written, rerun the job")
    n_corrupt = sum(len(r["corrupt"]) for r in records)
    if sum(r["count"] for r in records) + n_corrupt != len(src.files):
        raise RuntimeError(f"precompute: shards hold {sum(r['count'] for r in records)} samples + {n_corrupt} "
                           f"corrupt inputs, not the {len(src.files)} listed images; the manifest was not written")
    manifest = build_manifest(cfg, src, vae_info, latent_shape, per_shard, records, out)
    out.put_text(MANIFEST, json.dumps(manifest, indent=1))  # written last: its presence means complete
    return {"manifest": manifest, "written": [r["shard"] for r in records if not r["skipped"]],
            "skipped": [r["shard"] for r in records if r["skipped"]]}


def build_parser(prog: str = "python -m data_pipeline.run") -> TypedArgParser:
    """A flag per PrecomputeConfig field (typed, help from its docstring), plus the job's own flags."""
    p = TypedArgParser(PrecomputeConfig, prog=prog, description=__doc__)
    g = p.add_argument_group("job")
    g.add_argument("--config", help="JSON or YAML file with PrecomputeConfig fields (flags override it)")
    g.add_argument("--executor", choices=["ray", "inline"], default="ray",
                   help="ray: one task per shard on a Ray cluster; inline: in this process (default: ray)")
    g.add_argument("--ray-address", default=None, help="Ray address (default: RAY_ADDRESS / job context / local)")
    return p


def _read_config_file(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        d = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: {' '.join(str(e).split())}") from e  # one line, also for YAML's
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path}: expected a mapping of PrecomputeConfig fields")
    return d


def parse_args(argv=None, prog: str = "python -m data_pipeline.run") -> tuple[PrecomputeConfig, argparse.Namespace]:
    p = build_parser(prog)
    ns = p.parse_namespace(argv)
    base = _read_config_file(ns.config) if ns.config else {}
    return p.build(ns, base, base_name=f"--config file {ns.config}"), ns


def main(argv=None, prog: str = "python -m data_pipeline.run") -> int:
    from igscale.storage import USER_ERRORS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg, a = parse_args(argv, prog)
    except ConfigError as e:
        return cli_error(prog, e)
    try:
        address = a.ray_address or os.environ.get("RAY_ADDRESS")
        result = precompute(cfg, executor=a.executor, ray_address=address)
    except USER_ERRORS as e:  # missing input, missing bucket, credentials: one line, exit 2
        print(f"precompute: error: {e}", file=sys.stderr)
        return 2
    m = result["manifest"]
    print(json.dumps({"manifest": open_storage(cfg.output, endpoint_url=cfg.endpoint_url).url(MANIFEST),
                      "num_samples": m["num_samples"], "corrupt": len(m["corrupt"]),
                      "written": result["written"], "skipped": result["skipped"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
