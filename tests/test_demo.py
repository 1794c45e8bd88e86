"""`igscale demo`: its autoencoder learns the toy images, and a reduced run produces every stage's artefact."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from igscale.demo.autoencoder import heldout_mse, reconstruction_mse, train_autoencoder
from igscale.demo.toy import CLASSES, toy_arrays
from igscale.demo.weights import save_vae
from igscale.storage import open_storage
from igscale.vae import build_vae


def test_whitening_keeps_the_autoencoder_function():
    """Folding the per-channel latent whitening into the 1x1 convolutions changes the latents to (z - mu) / sd and
    nothing else: reconstructions agree to float32 rounding of a few extra multiply-adds."""
    from diffusers import AutoencoderKL

    from igscale.demo.autoencoder import DEMO_VAE, whiten_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(**DEMO_VAE).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        rec0 = vae.decode(before.mean).sample
        mu, sd = before.mean.mean((0, 2, 3)), before.mean.std((0, 2, 3))
        whiten_latents(vae, mu, sd)
        after = vae.encode(x).latent_dist
        rec1 = vae.decode(after.mean).sample
    view = (1, -1, 1, 1)
    # |rec| ~ 1 through ~40 float32 layers: a relative error of order 40 * 2**-24 * fan-in growth stays below 1e-4
    assert torch.allclose(after.mean, (before.mean - mu.view(view)) / sd.view(view), atol=1e-5)
    assert torch.allclose(after.std, before.std / sd.view(view), rtol=1e-4)
    assert torch.allclose(rec1, rec0, atol=1e-4)
    assert torch.allclose(after.mean.mean((0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(after.mean.std((0, 2, 3)), torch.ones(4), atol=1e-5)
    assert vae.config.scaling_factor == 1.0


@pytest.mark.slow
def test_demo_autoencoder_reconstructs_heldout_images(tmp_path):
    """A short training run already reconstructs unseen toy images several times better than random weights, and
    the saved folder loads through the production SD-VAE path unchanged."""
    torch.set_num_threads(2)
    train_x, _ = toy_arrays(per_class=32, seed=0)
    held_x, _ = toy_arrays(per_class=4, seed=1)
    vae, _ = train_autoencoder(train_x, steps=150, log=lambda _: None)
    res = heldout_mse(vae, held_x)
    # measured ~4-5x after 150-300 steps; 2.5x leaves room for other BLAS kernels' training trajectories
    assert res["ratio"] > 2.5, res
    save_vae(vae, open_storage(str(tmp_path / "vae")))
    loaded = build_vae("sd-vae", str(tmp_path / "vae"))
    assert loaded.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)  # the same tensors, so the same reconstructions
    assert reconstruction_mse(loaded, held_x) == res["trained"]


@pytest.mark.slow
def test_reduced_demo_produces_every_artefact(tmp_path):
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    cmd = [sys.executable, "-m", "igscale.cli.main", "demo", "--workdir", str(work), "--per-class", "16",
           "--held-out", "8", "--ae-steps", "10", "--steps", "12", "--num-samples", "16", "--inception-images", "8"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((work / "demo_summary.json").read_text())
    assert list(s["stages_s"]) == ["S3 server", "images", "autoencoder", "precompute (Ray)",
                                   "train (DeepSpeed, 2 processes)", "export", "sample (2 processes)",
                                   "score (toy features)", "Inception code path", "grid"]
    assert s["images"] == 16 * len(CLASSES)
    assert set(s["metrics"]) == {"none", "IG", "CFG", "CFG+IG", "real"}
    for m in s["metrics"].values():
        assert np.isfinite(m["fd"]) and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
        assert 0 <= m["accuracy"] <= 1
    assert np.isfinite(s["inception_code_path"]["fid"])
    assert (work / "sample_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("none", "ig", "cfg", "cfg_ig"):  # each setting: 16 balanced samples at 64 px
        with np.load(work / f"samples_{name}.npz") as z:
            assert z["arr_0"].shape == (16, 64, 64, 3) and np.bincount(z["arr_1"]).tolist() == [4, 4, 4, 4]
    log = (work / "train" / "train_log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 12
    assert list((work / "train" / "tensorboard").rglob("events.out.tfevents.*"))
    for stage in ("precompute", "train", "export", "sample", "eval_inception"):
        assert (work / "logs" / f"{stage}.log").stat().st_size > 0
    assert "IG" in r.stdout and "stage times" in r.stdout and "code-path check" in r.stdout
    assert "label accuracy: none" in r.stdout and "sampling noise up to +-0.125 at 16 samples" in r.stdout
