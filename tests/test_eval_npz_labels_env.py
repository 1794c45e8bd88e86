"""ADM npz validation/streaming, label protocols, launcher environment detection."""
import numpy as np
import pytest

from igscale.distributed.env import detect_env
from igscale.eval.labels import make_labels
from igscale.eval.npz import (
    NpzFormatError,
    iter_batches,
    load_ref_stats,
    validate_ref_npz,
    validate_sample_npz,
    write_npz_streaming,
)


def test_streaming_roundtrip(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (11, 5, 6, 3), dtype=np.uint8)
    p = str(tmp_path / "s.npz")
    write_npz_streaming(p, "arr_0", x.shape, np.uint8, [x[:4], x[4:9], x[9:]], extra={"arr_1": np.arange(11)})
    with np.load(p) as z:  # readable by plain numpy, as ADM's evaluator reads it
        np.testing.assert_array_equal(z["arr_0"], x)
        np.testing.assert_array_equal(z["arr_1"], np.arange(11))
    assert validate_sample_npz(p) == x.shape
    got = np.concatenate(list(iter_batches(p, "arr_0", 3, start=2, stop=10)))
    np.testing.assert_array_equal(got, x[2:10])
    with pytest.raises(ValueError, match="expected 12"):
        write_npz_streaming(str(tmp_path / "bad.npz"), "arr_0", (12, 5, 6, 3), np.uint8, [x])


def test_sample_npz_errors(tmp_path):
    p = tmp_path / "f.npz"
    np.savez(p, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(NpzFormatError, match="uint8"):
        validate_sample_npz(str(p))
    np.savez(p, arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(NpzFormatError, match="NCHW"):
        validate_sample_npz(str(p))
    np.savez(p, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(NpzFormatError, match="missing key 'arr_0'"):
        validate_sample_npz(str(p))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(NpzFormatError, match="not an npz"):
        validate_sample_npz(str(tmp_path / "junk.npz"))
    with pytest.raises(FileNotFoundError):
        validate_sample_npz(str(tmp_path / "missing.npz"))


def test_ref_npz_errors(tmp_path):
    p = str(tmp_path / "ref.npz")
    good = dict(mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32), mu_s=np.zeros(2023),
                sigma_s=np.eye(2023), arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(p, **good)
    validate_ref_npz(p)
    assert load_ref_stats(p)["sigma"].dtype == np.float64
    np.savez(p, **{k: v for k, v in good.items() if k not in ("mu_s", "sigma_s")})
    with pytest.raises(NpzFormatError, match=r"missing key\(s\) \['mu_s', 'sigma_s'\]"):
        validate_ref_npz(p)
    np.savez(p, arr_0=good["arr_0"])  # images only: accepted, the statistics are computed from arr_0
    assert validate_ref_npz(p) is False and load_ref_stats(p) is None
    np.savez(p, **{**good, "sigma": np.eye(100)})
    with pytest.raises(NpzFormatError, match="sigma must be a float array of shape"):
        validate_ref_npz(p)


def test_balanced_labels_exactly_50_per_class():
    y = make_labels(50_000, 1000, "balanced", base_seed=3)
    assert y.shape == (50_000,)
    np.testing.assert_array_equal(np.bincount(y, minlength=1000), np.full(1000, 50))
    assert not np.array_equal(y[:1000], np.repeat(np.arange(20), 50))  # shuffled, not sorted
    np.testing.assert_array_equal(y, make_labels(50_000, 1000, "balanced", base_seed=3))
    with pytest.raises(ValueError, match="divisible by num_classes"):
        make_labels(50_001, 1000, "balanced")


def test_random_labels_are_per_sample():
    a = make_labels(200, 1000, "random", base_seed=10)
    # sample i depends only on its seed base_seed+i: shifting the base seed shifts the list
    np.testing.assert_array_equal(make_labels(150, 1000, "random", base_seed=60), a[50:])
    np.testing.assert_array_equal(make_labels(20, 1000, "random", base_seed=10), a[:20])
    assert 0 <= a.min() and a.max() < 1000 and len(np.unique(a)) > 150
    with pytest.raises(ValueError, match="unknown label mode"):
        make_labels(10, 10, "uniform")


def test_detect_env():
    assert detect_env({}).world_size == 1
    e = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (3, 4, 1, "torchrun")
    e = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (5, 8, 1, "slurm")
    # torchrun inside an srun allocation: torchrun's variables win
    e = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "1", "WORLD_SIZE": "2"})
    assert (e.rank, e.world_size) == (1, 2)
    with pytest.raises(ValueError, match="inconsistent"):
        detect_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="not an integer"):
        detect_env({"RANK": "x", "WORLD_SIZE": "4"})
