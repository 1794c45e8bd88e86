"""Fingerprints of a result's inputs: the sha256 of every file it was computed from, and which igscale computed it.

samples.json and metrics.json carry them, so a number can be traced to exact bytes (a checkpoint, VAE weights,
latent statistics, the Inception file, the reference batch) rather than to paths that may since hold other files.
job.json keeps its own identity (content hashes of the loaded weights), which decides whether a folder may be
resumed; these fingerprints only describe.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from igscale.storage import is_s3_url, open_storage, split_url

__all__ = ["file_fingerprint", "sha256_of", "provenance", "input_fingerprints", "samples_meta", "scoring_record"]

_BLOCK = 8 << 20


def sha256_of(stream) -> tuple[str, int]:
    """(hex sha256, byte count) of a binary stream, read in 8 MiB blocks (checkpoints do not fit in memory twice)."""
    h, n = hashlib.sha256(), 0
    while block := stream.read(_BLOCK):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def _one(store, key: str) -> dict:
    with store.open_read(key) as f:
        digest, n = sha256_of(f)
    return {"sha256": digest, "bytes": n}


def _is_folder(url: str) -> bool:
    if not is_s3_url(url):
        return os.path.isdir(url.removeprefix("file://"))
    store, name = split_url(url)
    return url.endswith("/") or not store.exists(name)


def file_fingerprint(url: str, *, local: str | None = None) -> dict:
    """{"url", "sha256", "bytes"} of one file, or {"url", "files": {relative key: {"sha256", "bytes"}}} of every file
    in a folder (a diffusers VAE folder, an export). Streams through igscale.storage (local paths and s3://);
    `local`: an already fetched copy of `url` to hash instead (no second download)."""
    if local is not None:
        with open(local, "rb") as f:
            digest, n = sha256_of(f)
        return {"url": url, "sha256": digest, "bytes": n}
    if _is_folder(url):
        root = open_storage(url)
        keys = sorted(root.list())
        if not keys:
            raise FileNotFoundError(f"no such file or folder: {url}")
        return {"url": url, "files": {k: _one(root, k) for k in keys}}
    store, name = split_url(url)
    return {"url": url, **_one(store, name)}


def input_fingerprints(args, names: tuple[str, ...] = ("export", "checkpoint", "vae_weights", "latent_stats")) -> dict:
    """Fingerprints of the input files a command config names (unset ones and ones its decoder does not read are
    left out)."""
    vae = getattr(args, "vae", None) or "none"
    skip = {"vae_weights", "latent_stats"} if vae == "none" else {"latent_stats"} if vae == "sd-vae" else set()
    return {n: file_fingerprint(getattr(args, n)) for n in names if n not in skip and getattr(args, n, None)}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("igscale")
    except PackageNotFoundError:  # a source tree that was never installed
        import igscale

        return igscale.__version__


def _git_commit() -> str | None:
    """HEAD of the source checkout igscale is imported from (never the network), else $IGSCALE_GIT_COMMIT (set by
    image builds, where the package is installed without its .git), else None."""
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return os.environ.get("IGSCALE_GIT_COMMIT") or None


def samples_meta(args, settings: dict, cfg, sampler, guidance, *, world_size: int, seconds: float,
                 fingerprints: dict | None = None) -> dict:
    """What `igscale sample` and `igscale reproduce` write into samples.json: the job's settings, sampler and
    guidance, the run, and the inputs' fingerprints and provenance (`fingerprints`: already computed ones)."""
    from igscale.core.typed import to_dict
    from igscale.eval.generate import describe

    return {**settings, **describe(cfg), "preset": args.preset, "sampler": to_dict(sampler),
            "guidance": to_dict(guidance), "nfe_per_sample": sampler.nfe(), "label_protocol": cfg.labels,
            "world_size": world_size, "seconds_last_run": round(seconds, 3),
            "fingerprints": input_fingerprints(args) if fingerprints is None else fingerprints,
            "provenance": provenance()}


def provenance() -> dict:
    return {"igscale_version": _version(), "git_commit": _git_commit()}


def scoring_record(inception, **inputs: dict) -> dict:
    """What metrics.json holds besides the metrics: whether the Inception file is the published one, the
    fingerprints of it and of the other inputs (`inputs`: name -> file_fingerprint), and provenance."""
    info = inception.igscale_info
    return {"inception_verified": info["verified"], "provenance": provenance(),
            "fingerprints": {"inception": info, **inputs}}
