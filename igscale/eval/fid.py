"""Fréchet distance between Gaussians fitted to Inception features (FID / sFID), in float64.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).
tr((S1 S2)^{1/2}) is computed as the sum of sqrt(eigvals(A S2 A)) with A = S1^{1/2}: A S2 A is symmetric PSD and
similar to S1 S2, so this avoids the non-symmetric `scipy.linalg.sqrtm` (and its complex round-off) used by
the ADM/TTUR code while being mathematically identical for covariance matrices.

When one side is given as n <= D features (small sweeps, tests), S2 = B B^T with B = (X - mu)^T / sqrt(n-1), and
the non-zero eigenvalues of S1 S2 are those of the small n x n matrix B^T S1 B: exact, cheap, and free of the
sqrt(round-off) error that rank-deficient covariances cause in the dense route.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GaussianStats", "compute_stats", "frechet_distance", "frechet_distance_to_features"]


@dataclass
class GaussianStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64


def compute_stats(features: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance (np.cov, rowvar=False: the ADM definition) of (N, D) features, in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N>=2, D) features for statistics, got shape {x.shape}")
    return GaussianStats(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    if not (np.isfinite(s1).all() and np.isfinite(s2).all() and np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise ValueError("statistics contain NaN or inf")
    # Symmetrize: stored covariances can carry float round-off asymmetry.
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    a = _psd_sqrt(s1)
    m = a @ s2 @ a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_to_features(features: np.ndarray, mu_ref, sigma_ref) -> float:
    """Fréchet distance between the Gaussian fitted to (N, D) `features` (np.cov definition) and N(mu_ref, sigma_ref).

    Uses the n x n low-rank route when N - 1 < D, the dense D x D route otherwise.
    """
    x = np.asarray(features, dtype=np.float64)
    st = compute_stats(x)
    n, d = x.shape
    mu_ref = np.atleast_1d(np.asarray(mu_ref, np.float64))
    s_ref = np.atleast_2d(np.asarray(sigma_ref, np.float64))
    if n - 1 >= d:
        return frechet_distance(st.mu, st.sigma, mu_ref, s_ref)
    if mu_ref.shape != (d,) or s_ref.shape != (d, d):
        raise ValueError(f"statistics do not match: features have D={d}, reference mu {mu_ref.shape} sigma {s_ref.shape}")
    s_ref = (s_ref + s_ref.T) / 2
    b = (x - st.mu).T / np.sqrt(n - 1)  # (D, n), sigma = b b^T
    m = b.T @ s_ref @ b  # (n, n), shares the non-zero spectrum of sigma_ref @ sigma
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    diff = st.mu - mu_ref
    return float(diff @ diff + np.trace(s_ref) + (b * b).sum() - 2.0 * np.sqrt(np.clip(eig, 0.0, None)).sum())
