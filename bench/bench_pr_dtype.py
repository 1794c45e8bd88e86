"""Precision/recall with float32 vs ADM's float16 distances, side by side on the same features, in one run.

    python bench/bench_pr_dtype.py [--n-ref 10000] [--n-sample 10000] [--seeds 3]
    python bench/bench_pr_dtype.py --ref-features ref.npz --sample-features smp.npz   # real Inception pool features

Without feature files it draws synthetic 2048-d features shaped like Inception pool3 features of natural images:
non-negative (a ReLU of a correlated low-rank Gaussian plus noise), mean ~0.4 and |x|^2 of a few hundred, with the
sample set a slightly shifted and rescaled copy of the reference distribution (a good but imperfect generator).
Feature files: any npz whose first array is (N, 2048) float features (e.g. saved from igscale.eval.evaluate).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from igscale.eval.metrics import precision_recall


def synthetic(n: int, rank: int, rng: np.random.Generator, basis: np.ndarray, shift: float, scale: float) -> np.ndarray:
    h = rng.standard_normal((n, rank)).astype(np.float32)
    z = (h * scale) @ basis + 0.25 * rng.standard_normal((n, basis.shape[1])).astype(np.float32) + shift
    return np.maximum(z, 0.0).astype(np.float32)  # (n, 2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-ref", type=int, default=10000)
    ap.add_argument("--n-sample", type=int, default=10000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ref-features", default=None)
    ap.add_argument("--sample-features", default=None)
    a = ap.parse_args()
    if a.ref_features:
        load = lambda path: np.load(path)["arr_0"].astype(np.float32)  # noqa: E731
        sets = [(load(a.ref_features), load(a.sample_features))]
    else:
        sets = []
        for seed in range(a.seeds):
            rng = np.random.default_rng(seed)
            basis = (rng.standard_normal((64, 2048)) / 8).astype(np.float32)
            ref = synthetic(a.n_ref, 64, rng, basis, 0.05, 1.0)
            smp = synthetic(a.n_sample, 64, rng, basis, 0.06, 0.97)
            sets.append((ref, smp))
    print(f"features: {'files' if a.ref_features else 'synthetic'}; ref mean {sets[0][0].mean():.3f}, "
          f"|x|^2 median {np.median((sets[0][0] ** 2).sum(1)):.0f}")
    print("| set | P fp32 | P fp16 | dP | R fp32 | R fp16 | dR | s fp32 | s fp16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (ref, smp) in enumerate(sets):
        t0 = time.perf_counter()
        p32, r32 = precision_recall(ref, smp)
        t1 = time.perf_counter()
        p16, r16 = precision_recall(ref, smp, dtype="float16")
        t2 = time.perf_counter()
        print(f"| {i} | {p32:.4f} | {p16:.4f} | {p16 - p32:+.4f} | {r32:.4f} | {r16:.4f} | {r16 - r32:+.4f} | "
              f"{t1 - t0:.1f} | {t2 - t1:.1f} |")


if __name__ == "__main__":
    main()
