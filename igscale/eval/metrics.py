"""Inception Score and improved precision/recall with the ADM evaluator's definitions.

- IS: softmax over the bias-free logits (pool3 @ W, 1008 classes), split into parts of 5000 samples,
  exp(mean_i KL(p(y|x_i) || p(y))) per part, averaged over parts.
- Precision/recall (Kynkäänniemi et al. 2019, k=3): the radius of each point is the squared euclidean distance
  to its 3rd nearest neighbour within its own set (the point itself counts as the 0th). Precision is the fraction
  of samples inside at least one reference ball, recall the fraction of references inside a sample ball.
  Distances are computed in float32 blocks by default. `distance_dtype="float16"` follows the ADM evaluator instead:
  features and every distance op in float16, the block recomputed in float32 if any float16 distance is not finite.
  float16 rounding moves distances by ~1e-3 relative, so it shifts precision/recall slightly (docs/evaluation.md).
"""
from __future__ import annotations

import numpy as np
import torch

from igscale.eval.fid import GaussianStats, frechet_distance_to_features

__all__ = ["DISTANCE_DTYPES", "inception_score", "manifold_radii", "precision_recall", "compute_all_metrics"]


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """IS from (N, K) logits. Softmax in float64; parts of `split_size` rows (the last may be shorter)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or len(z) == 0:
        raise ValueError(f"need (N, K) logits, got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        py = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: softmax outputs can underflow to exactly zero in float64.
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


DISTANCE_DTYPES = ("float32", "float16")


def _sqdist32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # (n, m) squared euclidean distances, clamped at 0 (a point's distance to itself may round below 0).
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _sqdist(a: torch.Tensor, b: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """(n, m) float32 squared distances, computed in `dtype` (float16: every op rounds to float16, with a float32
    recomputation of the block when a float16 result overflows)."""
    if dtype == "float32":
        return _sqdist32(a, b)
    d = _sqdist32(a.half(), b.half())
    return d.float() if bool(torch.isfinite(d).all()) else _sqdist32(a, b)


def _check_dtype(dtype: str) -> None:
    if dtype not in DISTANCE_DTYPES:
        raise ValueError(f"distance dtype must be one of {DISTANCE_DTYPES}, got {dtype!r}")


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 10000, dtype: str = "float32") -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour in the same set (self = 0th)."""
    _check_dtype(dtype)
    f = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points, got {len(f)}")
    out = torch.empty(len(f))
    for i in range(0, len(f), block):
        d = _sqdist(f[i : i + block], f, dtype)
        out[i : i + block] = torch.kthvalue(d, k + 1, dim=1).values
    return out.numpy()


def _fraction_inside(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, block: int,
                     dtype: str) -> float:
    inside = torch.zeros(len(points), dtype=torch.bool)
    for i in range(0, len(points), block):
        for j in range(0, len(centers), block):
            d = _sqdist(points[i : i + block], centers[j : j + block], dtype)
            inside[i : i + block] |= (d <= radii[None, j : j + block]).any(dim=1)
    return float(inside.double().mean())


def precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3, block: int = 10000,
                     dtype: str = "float32") -> tuple[float, float]:
    """(precision, recall) of `sample` features against `ref` features, ADM/Kynkäänniemi definition; `dtype` of
    the distance computation (float32, or ADM's float16)."""
    _check_dtype(dtype)
    r = torch.as_tensor(np.asarray(ref, dtype=np.float32))
    s = torch.as_tensor(np.asarray(sample, dtype=np.float32))
    if r.ndim != 2 or s.ndim != 2 or r.shape[1] != s.shape[1]:
        raise ValueError(f"feature shapes do not match: ref {tuple(r.shape)}, sample {tuple(s.shape)}")
    radii_r = torch.as_tensor(manifold_radii(r.numpy(), k, block, dtype))
    radii_s = torch.as_tensor(manifold_radii(s.numpy(), k, block, dtype))
    precision = _fraction_inside(s, r, radii_r, block, dtype)
    recall = _fraction_inside(r, s, radii_s, block, dtype)
    return precision, recall


def compute_all_metrics(
    sample_pool: np.ndarray,
    sample_spatial: np.ndarray,
    sample_logits: np.ndarray,
    ref_stats: GaussianStats,
    ref_stats_spatial: GaussianStats,
    ref_pool: np.ndarray,
    *,
    is_split: int = 5000,
    pr_distance_dtype: str = "float32",
) -> dict[str, float]:
    """FID, sFID, IS, precision, recall of a sample set against a reference batch (ADM evaluator protocol)."""
    prec, rec = precision_recall(ref_pool, sample_pool, dtype=pr_distance_dtype)
    return {
        "fid": frechet_distance_to_features(sample_pool, ref_stats.mu, ref_stats.sigma),
        "sfid": frechet_distance_to_features(sample_spatial, ref_stats_spatial.mu, ref_stats_spatial.sigma),
        "inception_score": inception_score(sample_logits, is_split),
        "precision": prec,
        "recall": rec,
        "num_samples": int(len(sample_pool)),
        "num_ref_images": int(len(ref_pool)),
    }
