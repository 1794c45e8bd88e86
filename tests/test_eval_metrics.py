"""FID / IS / precision-recall against closed forms, hand-built cases and independent implementations."""
import numpy as np
import pytest
import scipy.linalg

from igscale.eval.fid import compute_stats, frechet_distance, frechet_distance_to_features
from igscale.eval.metrics import inception_score, manifold_radii, precision_recall


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def _closed_form_commuting(mu1, mu2, a, b):
    # For S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: tr(sqrt(S1 S2)) = sum sqrt(a b).
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 512
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 5.0, d), rng.uniform(0.1, 5.0, d)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert _rel(got, _closed_form_commuting(mu1, mu2, a, b)) < 1e-6


def test_fid_commuting_dense_closed_form():
    rng = np.random.default_rng(1)
    d = 256
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.01, 3.0, d), rng.uniform(0.01, 3.0, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.1
    got = frechet_distance(mu1, s1, mu2, s2)
    assert _rel(got, _closed_form_commuting(mu1, mu2, a, b)) < 1e-6
    # identical Gaussians are at distance 0 (up to float64 round-off)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


def test_fid_one_dimensional():
    assert _rel(frechet_distance([1.5], [[4.0]], [-0.5], [[0.25]]), 2.0**2 + (2.0 - 0.5) ** 2) < 1e-12


def test_fid_general_matches_ttur_sqrtm():
    # Non-commuting covariances: compare with the TTUR/ADM formula through scipy's sqrtm, written out here.
    rng = np.random.default_rng(2)
    d = 64
    x, y = rng.normal(size=(400, d)), rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.3
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu1, mu2 = x.mean(0), y.mean(0)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert _rel(frechet_distance(mu1, s1, mu2, s2), ref) < 1e-6


def test_fid_low_rank_features_route():
    rng = np.random.default_rng(6)
    d, n = 300, 40
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.2 + 1.0
    a = rng.normal(size=(d, d))
    s_ref, mu_ref = a @ a.T / d + 0.1 * np.eye(d), rng.normal(size=d)
    # independent formula: tr sqrt(S_ref S_x) = nuclear norm of S_ref^(1/2) B, with S_x = B B^T
    st = compute_stats(x)
    b = (x - st.mu).T / np.sqrt(n - 1)
    root = np.real(scipy.linalg.sqrtm(s_ref))
    tr = np.linalg.svd(root @ b, compute_uv=False).sum()
    want = (st.mu - mu_ref) @ (st.mu - mu_ref) + np.trace(s_ref) + np.trace(st.sigma) - 2 * tr
    assert _rel(frechet_distance_to_features(x, mu_ref, s_ref), want) < 1e-6
    # A rank-deficient set against its own statistics is at distance 0 up to round-off. The bound: eigvalsh is
    # backward stable, |d lambda| <= n*u*||m||, so the n x n matrix's true-zero eigenvalue (from centring) can come out
    # as +n*u*lambda_max^2 and contribute sqrt(n*u)*lambda_max after the square root (sqrt(u), not u: the term that
    # varies with the BLAS kernel); the traces and products add about n*d*u*tr S.
    u = np.finfo(np.float64).eps
    lam_max = np.linalg.eigvalsh(st.sigma)[-1]
    bound = 2 * np.sqrt(n * u) * lam_max + 4 * n * d * u * np.trace(st.sigma)
    assert abs(frechet_distance_to_features(x, st.mu, st.sigma)) < bound
    assert bound < 1e-5 * np.trace(st.sigma)  # still far below any real mismatch, which is O(tr S)
    # n > d falls back to the dense route
    y = rng.normal(size=(50, 20))
    sy = compute_stats(y)
    assert frechet_distance_to_features(y, np.zeros(20), np.eye(20)) == frechet_distance(sy.mu, sy.sigma, np.zeros(20),
                                                                                          np.eye(20))


def test_stats_and_bad_input():
    x = np.random.default_rng(3).normal(size=(50, 7)).astype(np.float32)
    st = compute_stats(x)
    assert st.mu.dtype == np.float64 and st.sigma.shape == (7, 7)
    # two summation orders of the same float64 products differ by at most ~n*u*sum|x_i x_j| per entry
    x64 = x.astype(np.float64)
    atol = 4 * len(x) * np.finfo(np.float64).eps * (x64 ** 2).sum(0).max() / (len(x) - 1)
    np.testing.assert_allclose(st.sigma, np.cov(x64, rowvar=False), rtol=0, atol=atol)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N>=2"):
        compute_stats(np.zeros((1, 3)))


# ---------------------------------------------------------------- Inception Score

def test_is_confident_uniform_classes_equals_num_classes():
    k = 10
    logits = np.full((100, k), -1e3)
    logits[np.arange(100), np.arange(100) % k] = 0.0  # one-hot p(y|x), marginal uniform
    assert _rel(inception_score(logits), k) < 1e-12


def test_is_uninformative_is_one():
    assert _rel(inception_score(np.zeros((64, 1008))), 1.0) < 1e-12


def test_is_two_point_closed_form():
    a = 0.8
    p = np.array([[a, 1 - a], [1 - a, a]])
    kl = a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a))
    assert _rel(inception_score(np.log(p)), np.exp(kl)) < 1e-12


def test_is_splits_of_5000():
    logits = np.full((10000, 10), -1e3)
    logits[:5000, 0] = 0.0  # first split: all class 0 -> IS 1
    logits[np.arange(5000, 10000), np.arange(5000) % 10] = 0.0  # second split: IS 10
    assert _rel(inception_score(logits), 5.5) < 1e-12
    assert _rel(inception_score(logits, split_size=10000), np.exp(_mixture_kl())) < 1e-12


def _mixture_kl():
    # 5000 samples one-hot on class 0, 500 one-hot on each of 10 classes: marginal p0 = 0.55, others 0.05.
    p0, pk = 0.55, 0.05
    return 0.5 * np.log(1 / p0) + 0.05 * np.log(1 / p0) + 0.45 * np.log(1 / pk)


# ---------------------------------------------------------------- precision / recall

REF = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
SAMPLE = np.array([[-3.0], [6.5], [7.5], [10.0], [100.0]])


def test_radii_hand_computed():
    # squared distance to the 3rd nearest neighbour (self excluded)
    np.testing.assert_allclose(manifold_radii(REF), [9.0, 4.0, 4.0, 4.0, 9.0])
    np.testing.assert_allclose(manifold_radii(SAMPLE), [13.0**2, 9.5**2, 10.5**2, 13.0**2, 93.5**2])


def test_precision_recall_hand_case():
    # Reference balls cover [-3, 7] (boundary included, as ADM's `<=`): -3 and 6.5 are in, 7.5/10/100 are out.
    # The sample ball around -3 has radius 13 and holds every reference point.
    assert precision_recall(REF, SAMPLE) == (pytest.approx(0.4), pytest.approx(1.0))
    assert precision_recall(SAMPLE, REF) == (pytest.approx(1.0), pytest.approx(0.4))


def test_precision_recall_extremes():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 16))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, x + 1e3) == (0.0, 0.0)


def test_precision_recall_matches_bruteforce_and_blocking():
    rng = np.random.default_rng(5)
    ref, smp = rng.normal(size=(120, 8)), rng.normal(size=(90, 8)) * 1.3 + 0.3

    def brute(a, b, k=3):
        da = ((a[:, None] - a[None]) ** 2).sum(-1)
        ra = np.sort(da, axis=1)[:, k]
        db = ((b[:, None] - b[None]) ** 2).sum(-1)
        rb = np.sort(db, axis=1)[:, k]
        dab = ((b[:, None] - a[None]) ** 2).sum(-1)  # (nb, na)
        return (dab <= ra[None]).any(1).mean(), (dab.T <= rb[None]).any(1).mean()

    want = brute(ref, smp)
    assert precision_recall(ref, smp) == pytest.approx(want)
    assert precision_recall(ref, smp, block=17) == pytest.approx(want)
    with pytest.raises(ValueError, match="more than 3 points"):
        manifold_radii(np.zeros((3, 2)))


def test_float16_distances_follow_float16_rounding_within_its_error_bound():
    import torch

    from igscale.eval.metrics import _sqdist

    g = np.random.default_rng(0)
    a = np.abs(g.normal(0.4, 0.5, (64, 256))).astype(np.float32)  # post-ReLU-like features, |x|^2 ~ 100
    b = np.abs(g.normal(0.4, 0.5, (48, 256))).astype(np.float32)
    exact = ((a.astype(np.float64)[:, None, :] - b.astype(np.float64)[None]) ** 2).sum(-1)
    d16 = _sqdist(torch.from_numpy(a), torch.from_numpy(b), "float16").double().numpy()
    d32 = _sqdist(torch.from_numpy(a), torch.from_numpy(b), "float32").double().numpy()
    # float16 inputs (rel. 2^-11 each) and ~4 rounded float16 ops on terms of size |a|^2 + 2|a.b| + |b|^2:
    scale = (a**2).sum(1)[:, None] + 2 * np.abs(a @ b.T) + (b**2).sum(1)[None]
    assert np.all(np.abs(d16 - exact) <= 8 * 2.0**-11 * scale)
    assert np.all(np.abs(d32 - exact) <= 8 * 2.0**-24 * scale * 256)  # float32 stays far tighter
    assert np.abs(d16 - exact).max() > 10 * np.abs(d32 - exact).max()  # the float16 path really rounds


def test_float16_distances_fall_back_to_float32_on_overflow_and_agree_when_exact():
    big = np.array([[300.0, 0.0], [0.0, 300.0], [1.0, 1.0], [2.0, 2.0], [300.0, 300.0]], np.float32)  # |x|^2 > 65504
    assert precision_recall(big, big[::-1].copy(), dtype="float16") == precision_recall(big, big[::-1].copy())
    small = np.array([[0, 0], [1, 0], [0, 2], [3, 1], [1, 1], [2, 3]], np.float32)  # every distance exact in fp16
    other = np.array([[0, 1], [2, 0], [1, 3], [3, 3], [0, 4]], np.float32)
    assert precision_recall(small, other, dtype="float16") == precision_recall(small, other)
    with pytest.raises(ValueError, match="distance dtype"):
        precision_recall(small, other, dtype="bfloat16")
