"""Job config, input listing and the deterministic shard plan.

The sorted list of image keys fixes everything: image i has class index = position of its top-level folder in
the sorted folder names, and shard k always covers the same images: positions [k*n, (k+1)*n) of the sorted list
(shard_order "sorted"), or of a permutation of it drawn from the job's seed ("shuffled": every shard holds a
class-mixed sample, so a training loader's shuffle window of a few thousand samples sees many classes). A rerun
(after a crash, or on a bigger cluster) recomputes the same plan and only writes shards whose completion record
is missing or stale.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from igscale.core.typed import ConfigError, from_dict, to_dict
from igscale.latents.format import DTYPES, MODES
from igscale.storage import is_s3_url, open_storage

log = logging.getLogger("data_pipeline.plan")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class PrecomputeConfig:
    """The precompute job: a flag per field (`--samples-per-shard 5`) or a key of the --config file."""

    input: str
    """Image tree (local path or s3://bucket/prefix), one folder per class."""
    output: str
    """Dataset root (local path or s3://...): shards/ + manifest.json."""
    vae_kind: Literal["sd-vae", "va-vae-f16d32"] = "sd-vae"
    """sd-vae: f8, 4 channels (SiT); va-vae-f16d32: f16, 32 channels (LightningDiT)."""
    vae_weights: str | None = None
    """Local path or s3:// URL of the VAE weights; none: random weights (benchmarks/tests, needs
    --allow-random-vae)."""
    resolution: int = 256
    """Image side after the ADM centre crop (a multiple of 16)."""
    mode: Literal["mean_std", "sample_flip"] = "mean_std"
    """mean_std: store the posterior mean and std (training draws samples); sample_flip: store one posterior sample
    of the image and one of its mirror image."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype of the stored latents."""
    batch_size: int = 32
    """Images per VAE forward, per worker."""
    shard_size_mb: float = 1000.0
    """Target shard size; fixes samples_per_shard from the latent size."""
    samples_per_shard: int | None = None
    """Explicit samples per shard (none: from shard_size_mb)."""
    on_corrupt: Literal["skip", "abort"] = "skip"
    """An image that fails to decode: skip it (listed in the manifest) or fail the job."""
    seed: int = 0
    """Posterior samples in sample_flip mode depend only on (seed, image index); also seeds the shuffled plan."""
    shard_order: Literal["sorted", "shuffled"] = "sorted"
    """sorted: shard k is a contiguous range of the sorted image list (class-ordered shards: ~23 ImageNet classes
    per 1 GB shard); shuffled: the same ranges of a seeded permutation of it (class-mixed shards; the key of every
    sample is still its index in the sorted list)."""
    max_workers: int | None = None
    """Concurrent shard tasks (none: one per GPU, else one per cpus_per_worker CPUs)."""
    cpus_per_worker: float = 1.0
    """CPUs per shard task (also its torch threads)."""
    gpus_per_worker: float | None = None
    """GPUs per shard task (none: 1 if the cluster has GPUs, else 0)."""
    max_retries: int = 3
    """Ray retries of a shard task whose worker died."""
    decode_threads: int = 4
    """Image decode/crop threads per worker, overlapped with encoding."""
    endpoint_url: str | None = None
    """S3 endpoint (none: AWS_ENDPOINT_URL / S3_ENDPOINT_URL from the environment)."""
    allow_random_vae: bool = False
    """Must be set to run with random VAE weights (no --vae-weights)."""

    def __post_init__(self):
        if self.mode not in MODES or self.dtype not in DTYPES:
            raise ConfigError(f"mode/dtype: {self.mode!r}/{self.dtype!r}")
        for name in ("resolution", "batch_size", "decode_threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.resolution % 16:
            raise ConfigError(f"resolution: must be a multiple of 16, got {self.resolution}")
        if self.samples_per_shard is not None and self.samples_per_shard <= 0:
            raise ConfigError("samples_per_shard: must be positive")
        if not self.shard_size_mb > 0 or not self.cpus_per_worker > 0:
            raise ConfigError(f"shard_size_mb and cpus_per_worker: must be positive, got {self.shard_size_mb}, "
                              f"{self.cpus_per_worker}")
        if (self.max_workers is not None and self.max_workers < 1) or self.max_retries < 0 or self.seed < 0:
            raise ConfigError("max_workers: must be >= 1; max_retries and seed: >= 0")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker: must be >= 0, got {self.gpus_per_worker}")
        if self.vae_weights is None and not self.allow_random_vae:
            raise ConfigError("vae_weights: required (set allow_random_vae to use random weights for testing)")

    @classmethod
    def from_dict(cls, d: dict) -> PrecomputeConfig:
        return from_dict(cls, d)

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass
class SourceList:
    files: list[str]  # keys relative to the input root, sorted
    labels: list[int]
    classes: list[str]


def list_images(input_url: str, endpoint_url: str | None = None) -> SourceList:
    store = open_storage(input_url, endpoint_url=endpoint_url)
    store.check()
    listed = store.list()
    top = [k for k in listed if "/" not in k and k.lower().endswith(IMAGE_EXTS)]
    if top:  # they would be dropped silently, and belong to no class
        raise ConfigError(f"input: {len(top)} image(s) directly under {input_url} (e.g. {top[0]!r}); expected "
                          "<class>/<image>: move them into a class folder")
    keys = [k for k in listed if "/" in k and k.lower().endswith(IMAGE_EXTS)]
    if not keys:
        raise ConfigError(f"input: no images found under {input_url} (expected <class>/<image> files)")
    # Every class folder keeps its index, also one without images: dropping it would shift the labels of all
    # later classes. S3 has no empty folders; a folder holding only non-image files counts.
    folders = {k.split("/", 1)[0] for k in listed if "/" in k}
    if not is_s3_url(input_url):
        root = input_url.removeprefix("file://")
        folders |= {d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")}
    classes = sorted(folders)
    empty = sorted(folders - {k.split("/", 1)[0] for k in keys})
    if empty:
        log.warning("input: class folder(s) without images keep their index and get no samples: %s",
                    ", ".join(f"{c} (class {classes.index(c)})" for c in empty[:10]))
    index = {c: i for i, c in enumerate(classes)}
    return SourceList(keys, [index[k.split("/", 1)[0]] for k in keys], classes)


def samples_per_shard(cfg: PrecomputeConfig, latent_shape: tuple[int, ...]) -> int:
    if cfg.samples_per_shard:
        return cfg.samples_per_shard
    bytes_per = 2 * int(__import__("math").prod(latent_shape)) * (4 if cfg.dtype == "float32" else 2)
    bytes_per += 3 * 512 + 512  # tar headers + npy headers + label
    return max(1, int(cfg.shard_size_mb * 1e6 // bytes_per))


def shard_plan(n_images: int, per_shard: int, order: str = "sorted", seed: int = 0) -> list[list[int]]:
    """Sorted-list indices of the images of each shard: consecutive runs of per_shard of the plan order (each
    shard's indices ascending)."""
    if order == "sorted":
        return [list(range(s, min(s + per_shard, n_images))) for s in range(0, n_images, per_shard)]
    if order != "shuffled":
        raise ConfigError(f"shard_order: 'sorted' or 'shuffled', got {order!r}")
    perm = np.random.default_rng([seed, 0x5348]).permutation(n_images)
    return [np.sort(perm[s:s + per_shard]).tolist() for s in range(0, n_images, per_shard)]


def fingerprint(cfg: PrecomputeConfig, src: SourceList, vae_sha: str | None, per_shard: int) -> str:
    """Everything that determines shard contents. A completion record with another fingerprint is stale."""
    content = {
        "files": hashlib.sha256("\n".join(src.files).encode()).hexdigest(), "classes": src.classes,
        "vae": [cfg.vae_kind, vae_sha], "resolution": cfg.resolution, "mode": cfg.mode, "dtype": cfg.dtype,
        "seed": cfg.seed, "per_shard": per_shard, "input": cfg.input,
    }
    if cfg.shard_order != "sorted":  # absent for sorted, so shards written before the option are still complete
        content["shard_order"] = cfg.shard_order
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
