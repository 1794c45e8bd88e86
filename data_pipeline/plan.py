"""Job config, input listing and the deterministic shard plan.

The sorted list of image keys fixes everything: image i has class index = position of its top-level folder in
the sorted folder names, and shard k always covers images [k*n, (k+1)*n). A rerun (after a crash, or on a
bigger cluster) recomputes the same plan and only writes shards whose completion record is missing or stale.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from igscale.config.typed import ConfigError, from_dict, to_dict
from igscale.io.shard_format import DTYPES, MODES
from igscale.io.storage import open_storage

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class PrecomputeConfig:
    input: str  # image tree (local path or s3://bucket/prefix), one folder per class
    output: str  # dataset root (local path or s3://...): shards/ + manifest.json
    vae_kind: Literal["sd-vae", "va-vae-f16d32"] = "sd-vae"
    vae_weights: str | None = None  # local path or s3:// URL; None = random weights (benchmarks/tests only)
    resolution: int = 256
    mode: Literal["mean_std", "sample_flip"] = "mean_std"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = 32
    shard_size_mb: float = 1000.0  # target shard size; fixes samples_per_shard from the latent size
    samples_per_shard: int | None = None  # explicit override
    on_corrupt: Literal["skip", "abort"] = "skip"
    seed: int = 0  # posterior samples in sample_flip mode depend only on (seed, image index)
    max_workers: int | None = None  # concurrent shard tasks (default: one per GPU, else per cpus_per_worker)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs, else 0
    max_retries: int = 3  # Ray retries of a shard task whose worker died
    decode_threads: int = 4  # image decode/crop threads per worker, overlapped with encoding
    endpoint_url: str | None = None
    allow_random_vae: bool = False  # must be set to run with vae_weights=None

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
    keys = [k for k in store.list() if "/" in k and k.lower().endswith(IMAGE_EXTS)]
    if not keys:
        raise ConfigError(f"input: no images found under {input_url} (expected <class>/<image> files)")
    classes = sorted({k.split("/", 1)[0] for k in keys})
    index = {c: i for i, c in enumerate(classes)}
    return SourceList(keys, [index[k.split("/", 1)[0]] for k in keys], classes)


def samples_per_shard(cfg: PrecomputeConfig, latent_shape: tuple[int, ...]) -> int:
    if cfg.samples_per_shard:
        return cfg.samples_per_shard
    bytes_per = 2 * int(__import__("math").prod(latent_shape)) * (4 if cfg.dtype == "float32" else 2)
    bytes_per += 3 * 512 + 512  # tar headers + npy headers + label
    return max(1, int(cfg.shard_size_mb * 1e6 // bytes_per))


def shard_ranges(n_images: int, per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + per_shard, n_images)) for s in range(0, n_images, per_shard)]


def fingerprint(cfg: PrecomputeConfig, src: SourceList, vae_sha: str | None, per_shard: int) -> str:
    """Everything that determines shard contents. A completion record with another fingerprint is stale."""
    content = {
        "files": hashlib.sha256("\n".join(src.files).encode()).hexdigest(), "classes": src.classes,
        "vae": [cfg.vae_kind, vae_sha], "resolution": cfg.resolution, "mode": cfg.mode, "dtype": cfg.dtype,
        "seed": cfg.seed, "per_shard": per_shard, "input": cfg.input,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
