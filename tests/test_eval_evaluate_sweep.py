"""`igscale eval` (single and 2-rank gloo, known answers) and an end-to-end `igscale sweep` on CPU."""
import csv
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from igscale.cli import evaluate as cli_eval
from igscale.cli import sweep as cli_sweep
from igscale.demo.weights import random_published_state
from igscale.eval.export_io import save_export
from igscale.eval.inception import WEIGHTS_FILENAME
from tests.test_eval_sampling import _env, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _inception(weights: str) -> list[str]:
    """The Inception flags of these tests: random weights, so never the published file's sha256."""
    return ["--inception", weights, "--allow-unverified-weights"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalassets")
    torch.save(random_published_state(2), d / WEIGHTS_FILENAME)
    rng = np.random.default_rng(0)
    # "real" images: smooth random colour fields, so the features vary between images
    base = rng.integers(0, 256, (8, 2, 2, 3)).astype(np.float64)
    imgs = np.repeat(np.repeat(base, 4, 1), 4, 2) + rng.normal(0, 8, (8, 8, 8, 3))
    np.savez(d / "real.npz", arr_0=np.clip(imgs, 0, 255).astype(np.uint8))
    weights = str(d / WEIGHTS_FILENAME)
    rc = cli_eval.main(["--make-ref", str(d / "ref.npz"), "--images", str(d / "real.npz"), *_inception(weights)])
    assert rc == 0
    save_export(tiny_model(num_classes=4), str(d / "export"))
    return d, weights


def test_eval_reference_against_itself(assets, capsys):
    d, weights = assets
    with np.load(d / "ref.npz") as z:
        assert set(z.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s"}
        assert z["sigma_s"].shape == (2023, 2023)
        tr = np.trace(z["sigma"])
    out = d / "self.json"
    assert cli_eval.main([str(d / "ref.npz"), str(d / "real.npz"), *_inception(weights), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    # identical image sets: identical statistics (FID 0) and manifolds (P = R = 1)
    assert abs(m["fid"]) < 1e-6 * tr and abs(m["sfid"]) < 1e-6 * tr
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["inception_score"] >= 1.0
    assert "FID:" in capsys.readouterr().out
    # every input is fingerprinted; random weights are recorded as unverified
    fp = m["fingerprints"]
    for key, path in (("ref", d / "ref.npz"), ("sample", d / "real.npz"), ("inception", d / WEIGHTS_FILENAME)):
        assert fp[key]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), key
    assert m["inception_verified"] is False and fp["inception"]["verified"] is False
    assert set(m["provenance"]) == {"igscale_version", "git_commit"}


def test_eval_bad_inputs(assets, tmp_path, capsys):
    d, weights = assets
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    assert cli_eval.main([str(d / "ref.npz"), str(tmp_path / "bad.npz"), *_inception(weights)]) == 2
    assert "NHWC" in capsys.readouterr().err
    with np.load(d / "ref.npz") as z:
        np.savez(tmp_path / "partial.npz", arr_0=z["arr_0"], mu=z["mu"], sigma=z["sigma"])
    assert cli_eval.main([str(tmp_path / "partial.npz"), str(d / "real.npz"), *_inception(weights)]) == 2
    assert "missing key(s) ['mu_s', 'sigma_s']" in capsys.readouterr().err
    # weights whose sha256 is not the published file's are refused unless --allow-unverified-weights
    assert cli_eval.main([str(d / "ref.npz"), str(d / "real.npz"), "--inception", weights]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not start with 6726825d" in err and "--allow-unverified-weights" in err
    assert cli_eval.main([str(d / "ref.npz"), str(d / "real.npz"), "--inception", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert WEIGHTS_FILENAME in err and "github.com/mseitzer/pytorch-fid" in err


def test_eval_reference_without_statistics_uses_its_own_images(assets, tmp_path):
    # ref.npz stores statistics over all 8 images and the same 8 images as arr_0; real.npz stores the images only.
    d, weights = assets
    stored, computed = tmp_path / "stored.json", tmp_path / "computed.json"
    smp = tmp_path / "smp.npz"
    with np.load(d / "real.npz") as z:
        np.savez(smp, arr_0=z["arr_0"][::-1][:6])
    assert cli_eval.main([str(d / "ref.npz"), str(smp), *_inception(weights), "--out", str(stored)]) == 0
    assert cli_eval.main([str(d / "real.npz"), str(smp), *_inception(weights), "--out", str(computed)]) == 0
    a, b = json.loads(stored.read_text()), json.loads(computed.read_text())
    with np.load(d / "ref.npz") as z:
        tr, tr_s = np.trace(z["sigma"]), np.trace(z["sigma_s"])
    # The stored statistics came from another extraction of the same images (the fixture's process may use other
    # BLAS thread counts): float32 features agree to a few ulps, so FID terms (each ~tr/D) agree to ~1e-6 of tr.
    assert abs(a["fid"] - b["fid"]) <= 1e-6 * tr and abs(a["sfid"] - b["sfid"]) <= 1e-6 * tr_s
    assert (a["precision"], a["recall"], a["inception_score"]) == (b["precision"], b["recall"], b["inception_score"])


@pytest.mark.slow
def test_eval_two_ranks_matches_one(assets, tmp_path):
    d, weights = assets
    # perturbed samples so every metric is non-trivial
    with np.load(d / "real.npz") as z:
        x = z["arr_0"].astype(np.int16)
    x = np.clip(x[::-1] + np.random.default_rng(1).integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=x[:5])  # 5 rows: uneven split over 2 ranks
    one = tmp_path / "one.json"
    assert cli_eval.main([str(d / "ref.npz"), str(tmp_path / "s.npz"), *_inception(weights), "--batch-size", "3",
                          "--out", str(one)]) == 0
    two = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "igscale.cli.main", "eval", str(d / "ref.npz"), str(tmp_path / "s.npz"), *_inception(weights),
           "--batch-size", "2", "--out", str(two)]
    r = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["fid"] > 0 and a["num_samples"] == 5
    for k in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_sweep_end_to_end(assets, tmp_path):
    d, weights = assets
    out = tmp_path / "sweep"
    argv = ["--export", str(d / "export"), "--ref", str(d / "ref.npz"), *_inception(weights), "--out", str(out),
            "--num-samples", "4", "--chunk-size", "2", "--batch-size", "2", "--method", "euler", "--num-steps", "3",
            "--labels", "balanced", "--w-ig", "1.0", "1.5", "--w-cfg", "2.0", "--cfg-interval", "0,0.7",
            "--ig-interval", "0.2,1"]
    assert cli_sweep.main(argv) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(float(r["w_ig"]), float(r["w_cfg"]), r["cfg_interval"], r["ig_interval"]) for r in rows] == [
        (1.0, 2.0, "0-0.7", "0-1"), (1.5, 2.0, "0-0.7", "0.2-1")]  # w_ig=1 turns IG (and its interval) off
    assert all(np.isfinite(float(r["fid"])) and float(r["fid"]) > 0 for r in rows)
    assert rows[0]["fid"] != rows[1]["fid"]  # guidance changes the samples
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| point | w_ig | w_cfg |" in (out / "sweep.md").read_text()
    meta = json.loads((out / "sweep.json").read_text())["meta"]
    assert meta["label_protocol"] == "balanced" and meta["num_samples"] == 4
    point = json.loads((out / "point_001" / "metrics.json").read_text())
    assert point["fingerprints"]["export"]["files"].keys() == {"model.safetensors", "model_config.json"}
    assert point["fingerprints"]["sample"]["sha256"] == hashlib.sha256(
        (out / "point_001" / "samples.npz").read_bytes()).hexdigest()
    assert "fingerprints" in meta and "fingerprints" not in json.loads((out / "sweep.json").read_text())["rows"][0]
    # shared seeds: the same labels at every grid point
    labels = [np.load(out / f"point_{i:03d}" / "samples.npz")["arr_1"] for i in range(2)]
    assert all(np.array_equal(labels[0], lab) for lab in labels)
    # a rerun reuses every finished point
    mtime = os.path.getmtime(out / "point_000" / "metrics.json")
    assert cli_sweep.main(argv) == 0
    assert os.path.getmtime(out / "point_000" / "metrics.json") == mtime
    # --no-score samples the same grid (bitwise the same images) without a reference or Inception
    bare = tmp_path / "bare"
    no_score = [a for a in argv if a not in ("--ref", str(d / "ref.npz"), *_inception(weights))]
    assert cli_sweep.main([*no_score[:no_score.index("--out") + 1], str(bare),
                           *no_score[no_score.index("--out") + 2:], "--no-score"]) == 0
    for i in range(2):
        a, b = (np.load(o / f"point_{i:03d}" / "samples.npz")["arr_0"] for o in (out, bare))
        assert np.array_equal(a, b)
    assert not (bare / "point_000" / "metrics.json").exists() and not (bare / "sweep.png").exists()
    assert "| point | w_ig | w_cfg | cfg_interval | ig_interval | samples |" in (bare / "sweep.md").read_text()
    # scoring without a reference is a one-line usage error
    assert cli_sweep.main([*no_score[:no_score.index("--out") + 1], str(bare),
                           *no_score[no_score.index("--out") + 2:]]) == 2


def test_eval_warns_when_reference_resolution_differs(assets, tmp_path, capsys):
    d, weights = assets
    with np.load(d / "real.npz") as z:
        big = np.repeat(np.repeat(z["arr_0"], 2, 1), 2, 2)  # 16x16 against the 8x8 reference
    np.savez(tmp_path / "big.npz", arr_0=big)
    assert cli_eval.main([str(d / "ref.npz"), str(tmp_path / "big.npz"), *_inception(weights)]) == 0
    out = capsys.readouterr()
    assert "samples are 16x16 px but the reference images are 8x8 px" in out.out + out.err
    assert cli_eval.main([str(d / "ref.npz"), str(d / "real.npz"), *_inception(weights)]) == 0
    out = capsys.readouterr()
    assert "reference images are" not in out.out + out.err
