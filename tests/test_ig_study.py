"""IG study (issue 7): a smoke run of the whole pipeline, plus checks that comparisons are fair and the metric sane."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from bench.ig_study.classifier import embed, train_classifier
from bench.ig_study.config import get_study_config
from bench.ig_study.data import load_digits_16
from bench.ig_study.evaluate import generate, make_reference, score
from bench.ig_study.run import steps_to_reach
from bench.ig_study.train import build_study_model, load_weights, train_run
from igscale.core.typed import ConfigError
from igscale.diffusion.guidance import GuidanceConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def data():
    return load_digits_16(0.3)


def test_split_is_stratified_disjoint_and_in_range(data):
    assert len(data.x_train) + len(data.x_heldout) == 1797
    assert data.x_train.shape[1:] == (1, 16, 16)
    assert data.x_train.min() >= -1 and data.x_train.max() <= 1
    for c in range(10):  # every class is held out at the requested fraction (±1 image)
        n_c = int((data.y_train == c).sum() + (data.y_heldout == c).sum())
        assert abs(int((data.y_heldout == c).sum()) - 0.3 * n_c) <= 1
    flat_tr = {tuple(r) for r in data.x_train.flatten(1).tolist()}
    dup = sum(tuple(r) in flat_tr for r in data.x_heldout.flatten(1).tolist())
    assert dup <= 2  # sklearn digits has a couple of exact duplicate images; the split itself is disjoint


def test_config_rejects_unknown_keys_and_bad_grids():
    with pytest.raises(ConfigError, match="train"):
        get_study_config("smoke", {"train": {"stepz": 3}})
    with pytest.raises(ValueError, match="w_ig = 1"):
        get_study_config("smoke", {"sample": {"w_ig": [2.0]}})


def test_steps_to_reach_interpolates():
    curve = [{"step": 100, "fd": 10.0}, {"step": 200, "fd": 6.0}, {"step": 300, "fd": 4.0}]
    assert steps_to_reach(curve, 5.0) == pytest.approx(250.0)
    assert steps_to_reach(curve, 11.0) == 100.0
    assert math.isinf(steps_to_reach(curve, 3.0))


def test_arms_are_paired_and_noaux_head_stays_untrained(data):
    cfg = get_study_config("smoke", {"train": {"steps": 8, "eval_every": 8}})
    a = train_run(cfg, data.x_train, data.y_train, seed=5, aux_weight=0.5)
    b = train_run(cfg, data.x_train, data.y_train, seed=5, aux_weight=0.0)
    # Same init and same first batch/t/noise: the D_f loss of step 1 is identical; later the aux loss matters (it
    # reaches the backbone only once the zero-init head has moved).
    assert a.main_loss[0] == b.main_loss[0]
    assert a.main_loss[-1] != b.main_loss[-1]
    head = [k for k in a.snapshots[8] if k.startswith("ig_heads.")]
    assert head and all(torch.count_nonzero(b.snapshots[8][k]) == 0 for k in head)  # zero-init head, no gradient
    assert any(torch.count_nonzero(a.snapshots[8][k]) > 0 for k in head)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU features make covariances singular
def test_metric_matches_independent_fd_and_separates_real_from_noise(data):
    torch.manual_seed(0)
    net = train_classifier(data.x_train, data.y_train, epochs=6, batch_size=64, lr=3e-3, feature_dim=16)
    ref = make_reference(net, data.x_heldout)
    real = score(net, ref, data.x_train[:300], data.y_train[:300])
    noise = score(net, ref, torch.rand(300, 1, 16, 16) * 2 - 1, data.y_train[:300])
    assert real["accuracy"] > 0.8 and real["fd"] * 5 < noise["fd"]
    # FD against an independent formula: |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) via scipy's sqrtm.
    f1, _ = embed(net, data.x_train[:300])
    f2 = ref.feats
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    fd = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert real["fd"] == pytest.approx(fd, rel=1e-5, abs=1e-6)


def test_samples_depend_only_on_seed_and_ig_is_free(data):
    cfg = get_study_config("smoke", {"train": {"steps": 4, "eval_every": 4}})
    run = train_run(cfg, data.x_train, data.y_train, seed=0, aux_weight=0.5)
    model = load_weights(cfg, run.snapshots[4])
    x20, y20, st = generate(model, 20, 3, GuidanceConfig(w_ig=2.0))
    x10, y10, _ = generate(model, 10, 3, GuidanceConfig(w_ig=2.0))
    torch.testing.assert_close(x20[:10], x10, rtol=1e-5, atol=1e-6)  # batch composition does not change a sample
    assert y20[:10].tolist() == list(range(10))
    assert st["rows_per_sample"] == 3  # IG costs no extra model rows
    x_plain, _, _ = generate(model, 10, 3, GuidanceConfig())
    x_one, _, _ = generate(model, 10, 3, GuidanceConfig(w_ig=1.0, w_cfg=1.0))
    assert torch.equal(x_plain, x_one) and not torch.equal(x_plain, x10)
    assert isinstance(build_study_model(cfg), torch.nn.Module)


def test_smoke_study_regenerates_document(tmp_path):
    import bench.ig_study.__main__ as mod

    out = tmp_path / "ig_study.md"
    mod.main(["--preset", "smoke", "--out", str(out), "--threads", "1", "--cache", str(tmp_path / "res.pt")])
    text = out.read_text()
    for needle in ("## Claim 1", "## Claim 2", "Wall time", "fd_vs_steps.png", "fd_vs_guidance.png", "samples.png"):
        assert needle in text
    for png in ("fd_vs_steps.png", "fd_vs_guidance.png", "samples.png"):
        assert (tmp_path / "ig_study" / png).stat().st_size > 5000
    res = json.loads((tmp_path / "ig_study" / "results.json").read_text())
    fds = [p["fd"] for arm in res["runs"].values() for r in arm for p in r["curve"] + r["sweep"] + r["confirm"]]
    assert fds and all(math.isfinite(f) and f >= 0 for f in fds)
