"""Distributed Inception feature extraction and ADM-protocol metrics for npz sample batches.

Each rank embeds a contiguous slice of the images; slices are padded to equal length and all-gathered, so every
rank ends with the full (N, D) features in sample order. Statistics and metrics are then computed in float64 on
rank 0 (`igscale.eval.fid`, `igscale.eval.metrics`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from igscale.distributed.collectives import all_gather
from igscale.distributed.env import DistEnv
from igscale.eval.fid import GaussianStats, compute_stats
from igscale.eval.inception import InceptionV3
from igscale.eval.metrics import compute_all_metrics
from igscale.eval.npz import iter_batches, load_ref_stats, validate_ref_npz, validate_sample_npz, write_npz_streaming
from igscale.storage import is_s3_url, split_url

__all__ = ["fetch_local", "extract_features", "evaluate_npz", "make_reference_batch"]

FEATURES = ("pool", "spatial", "logits")


class fetch_local:
    """Context manager: a local path for a local path or an s3:// object (downloaded to a temp dir)."""

    def __init__(self, url: str):
        self.url, self.tmp = url, None

    def __enter__(self) -> str:
        if not is_s3_url(self.url):
            return self.url.removeprefix("file://")
        store, name = split_url(self.url)
        self.tmp = tempfile.mkdtemp()
        path = os.path.join(self.tmp, name)
        store.get_file(name, path)
        return path

    def __exit__(self, *exc):
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


class strict_fp32:
    """Disable TF32 for convs/matmuls while extracting features (TF's graph ran in full fp32)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


@torch.no_grad()
def extract_features(
    npz_path: str, inception: InceptionV3, env: DistEnv, *, batch_size: int = 64, device="cpu",
    limit: int | None = None, desc: str = "inception",
) -> dict[str, np.ndarray]:
    """{pool (N,2048), spatial (N,2023), logits (N,1008)} for arr_0 of `npz_path` (first `limit` rows)."""
    n = validate_sample_npz(npz_path)[0] if limit is None else min(limit, validate_sample_npz(npz_path)[0])
    per = -(-n // env.world_size)
    lo, hi = min(env.rank * per, n), min((env.rank + 1) * per, n)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURES}
    bar = tqdm(total=hi - lo, desc=desc, unit="img", disable=not env.is_main, dynamic_ncols=True)
    for batch in iter_batches(npz_path, "arr_0", batch_size, lo, hi):
        with strict_fp32():
            out = inception(torch.from_numpy(batch.copy()).to(device))
        for k in FEATURES:
            parts[k].append(out[k].float())
        bar.update(len(batch))
    bar.close()
    feats = {}
    for k, dim in zip(FEATURES, (2048, 2023, 1008)):
        local = torch.cat(parts[k]) if parts[k] else torch.zeros(0, dim, device=device)
        if env.world_size > 1:
            padded = torch.zeros(per, dim, device=device)
            padded[: len(local)] = local
            gathered = all_gather(padded)
            local = torch.cat([g[: max(0, min(per, n - r * per))] for r, g in enumerate(gathered)])
        feats[k] = local.cpu().numpy()
    return feats


def evaluate_npz(
    sample_npz: str, ref_npz: str, inception: InceptionV3, env: DistEnv, *, batch_size: int = 64, device="cpu",
    log: Callable[[str], None] = print, ref_features: dict[str, np.ndarray] | None = None,
    pr_distance_dtype: str = "float32",
) -> dict[str, float] | None:
    """ADM metrics of a sample batch against a reference batch. Returns the dict on rank 0, None elsewhere.

    ref_features: reuse features of the reference images (from `extract_features`) across several evaluations.
    pr_distance_dtype: float32, or float16 as the ADM evaluator computes precision/recall distances.
    """
    validate_ref_npz(ref_npz)
    smp_shape = validate_sample_npz(sample_npz)
    ref_shape = validate_sample_npz(ref_npz)
    if smp_shape[1:3] != ref_shape[1:3] and env.is_main:
        # both are resized to 299 px by the Inception net, so this runs, but the numbers compare unlike protocols
        log(f"warning: samples are {smp_shape[1]}x{smp_shape[2]} px but the reference images are "
            f"{ref_shape[1]}x{ref_shape[2]} px; FID/sFID/P/R against a reference at another resolution are not "
            "comparable to published numbers")
    ref = ref_features or extract_features(ref_npz, inception, env, batch_size=batch_size, device=device,
                                           desc="reference")
    smp = extract_features(sample_npz, inception, env, batch_size=batch_size, device=device, desc="samples")
    if not env.is_main:
        return None
    st = load_ref_stats(ref_npz)
    if st is None:  # images only: the statistics of its own arr_0 features, as the ADM evaluator computes them
        log(f"{ref_npz} stores no statistics: computing them from its {len(ref['pool'])} images")
        pool, spatial = compute_stats(ref["pool"]), compute_stats(ref["spatial"])
    else:
        pool, spatial = GaussianStats(st["mu"], st["sigma"]), GaussianStats(st["mu_s"], st["sigma_s"])
    metrics = compute_all_metrics(smp["pool"], smp["spatial"], smp["logits"], pool, spatial, ref["pool"],
                                  pr_distance_dtype=pr_distance_dtype)
    log("Inception Score: {inception_score}\nFID: {fid}\nsFID: {sfid}\nPrecision: {precision}\nRecall: {recall}"
        .format(**metrics))
    return metrics


def make_reference_batch(
    images_npz: str, out_path: str, inception: InceptionV3, env: DistEnv, *, num_pr_images: int = 10_000,
    batch_size: int = 64, device="cpu",
) -> None:
    """Write an ADM reference batch: statistics over all images of `images_npz`, plus its first `num_pr_images`
    images as arr_0 for precision/recall (the VIRTUAL_imagenet256_labeled.npz layout)."""
    feats = extract_features(images_npz, inception, env, batch_size=batch_size, device=device, desc="reference")
    if not env.is_main:
        return
    s, ss = compute_stats(feats["pool"]), compute_stats(feats["spatial"])
    shape = validate_sample_npz(images_npz)
    k = min(num_pr_images, shape[0])
    write_npz_streaming(out_path, "arr_0", (k, *shape[1:]), np.uint8, iter_batches(images_npz, "arr_0", 1024, 0, k),
                        extra={"mu": s.mu, "sigma": s.sigma, "mu_s": ss.mu, "sigma_s": ss.sigma})
