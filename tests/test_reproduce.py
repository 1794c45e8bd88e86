"""`igscale reproduce` end to end on CPU, from random-weight files in the released formats: an official-layout SiT+IG
checkpoint, a diffusers VAE folder, a pytorch-fid-layout Inception file and an ADM reference batch without statistics.

A tiny preset is added to PRESETS at run time. Checked: the preset's wiring into samples.json, the refusal of flags
that contradict a preset (reproduce, sample, sweep), latent-channel mismatches, the fingerprints, the Inception hash
check, and an exact resume after SIGKILL.
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest
import torch

from igscale.cli import reproduce as cli_reproduce
from igscale.core.typed import to_dict
from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.presets import PRESETS, Preset
from igscale.diffusion.samplers import SamplerConfig
from igscale.eval.inception import WEIGHTS_FILENAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "tiny-sit-ig-test"
TINY = Preset(
    SamplerConfig(method="heun", num_steps=3, shift=2.0),
    GuidanceConfig(w_cfg=1.5, cfg_interval=(0.0, 0.7), w_ig=1.4, ig_interval=(0.0, 1.0), interval_at="step_start"),
    model="SiT-S/2", checkpoint_kind="sit", vae="sd-vae", quantization="sit", labels="random",
    description="tiny CPU SiT+IG (tests)", expected_fid=None,
    model_overrides=dict(input_size=8, in_channels=4, hidden_size=64, depth=4, num_heads=2, ig_layers=(2,),
                         num_classes=10),
)
N, CHUNK = 8, 2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, NAME, TINY)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from igscale.demo.weights import random_published_state, save_random_vae
    from igscale.models import build_model
    from igscale.storage import open_storage

    d = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    model = build_model(TINY.model, **TINY.model_overrides)
    with torch.no_grad():  # non-zero heads and adaLN so every guidance term matters
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    # the official SiT layout: IG head under final_layer_xr.*, weights under model and ema
    sd = {k.replace("ig_heads.0.", "final_layer_xr."): v for k, v in model.state_dict().items()}
    torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {}, "args": {}}, d / "ckpt.pt")
    save_random_vae(open_storage(str(d / "vae")), "sd-vae")
    torch.save(random_published_state(3), d / WEIGHTS_FILENAME)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 4, 4, 3)).astype(np.float64)
    imgs = np.repeat(np.repeat(base, 16, 1), 16, 2) + rng.normal(0, 8, (8, 64, 64, 3))
    np.savez(d / "ref.npz", arr_0=np.clip(imgs, 0, 255).astype(np.uint8))  # images only: no mu/sigma
    return d


def _argv(d, out, *extra):
    return ["--preset", NAME, "--checkpoint", str(d / "ckpt.pt"), "--vae-weights", str(d / "vae"),
            "--inception", str(d / WEIGHTS_FILENAME), "--ref", str(d / "ref.npz"), "--out", str(out),
            "--num-samples", str(N), "--chunk-size", str(CHUNK), "--batch-size", "2", "--eval-batch-size", "8",
            *extra]


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("cmd, extra", [
    ("reproduce", ["--checkpoint", "c.pt", "--ref", "r.npz", "--inception", "i.pth"]),
    ("sample", ["--checkpoint", "c.pt"]),
    ("sweep", ["--checkpoint", "c.pt", "--ref", "r.npz", "--inception", "i.pth"]),
])
def test_flags_that_contradict_the_preset_are_refused(cmd, extra, capsys):
    from igscale.cli.main import main

    base = [cmd, "--preset", "lightningdit-xl1-ig-cfg-fid1.19", "--out", "o", "--vae-weights", "v",
            "--latent-stats", "s.pt", *extra]
    for flag, value, theirs in (("--vae", "sd-vae", "va-vae-f16d32"), ("--quantization", "sit", "vavae"),
                                ("--labels", "balanced", "random"), ("--model", "SiT-XL/2", "LightningDiT-XL/1"),
                                ("--checkpoint-kind", "sit", "lightningdit")):
        assert main([*base, flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag} {value} contradicts --preset lightningdit-xl1" in err, err
        assert f"is {theirs};" in err, err
    # the preset's own values are accepted, and unset identity flags take them
    from igscale.eval.commands import ReproduceConfig, SampleConfig, SweepConfig

    cls = {"reproduce": ReproduceConfig, "sample": SampleConfig, "sweep": SweepConfig}[cmd]
    from igscale.core.cli_args import TypedArgParser

    cfg = TypedArgParser(cls).parse_args([*base[1:], "--vae", "va-vae-f16d32", "--labels", "random"])
    assert (cfg.model, cfg.checkpoint_kind, cfg.vae, cfg.quantization, cfg.labels) == (
        "LightningDiT-XL/1", "lightningdit", "va-vae-f16d32", "vavae", "random")
    if cmd == "reproduce":
        assert cfg.num_samples == 50_000  # the published protocol


def test_presets_added_at_run_time_are_accepted_and_listed(tiny_preset, capsys):
    from igscale.cli import sample

    assert NAME in sample.build_parser().format_help()
    cfg = sample.build_parser().parse_args(["--preset", NAME, "--checkpoint", "c.pt", "--vae-weights", "v", "--out",
                                            "o"])
    assert (cfg.model, cfg.vae, cfg.quantization) == ("SiT-S/2", "sd-vae", "sit")
    assert cli_reproduce.main(["--preset", "nope", "--checkpoint", "c", "--ref", "r", "--inception", "i", "--out",
                               "o"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--preset: 'nope' is not one of " in err and NAME in err


def test_latent_channel_mismatches_are_refused(tmp_path, capsys):
    from igscale.cli import sample
    from igscale.eval.export_io import save_export
    from tests.test_eval_sampling import tiny_model

    base = ["--out", str(tmp_path / "o"), "--num-samples", "2", "--method", "euler", "--num-steps", "1"]
    save_export(tiny_model(in_channels=3), str(tmp_path / "e3"))
    assert sample.main([*base, "--export", str(tmp_path / "e3"), "--vae", "sd-vae", "--vae-weights", "v"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes 3-channel latents but --vae sd-vae has 4 latent channels" in err
    save_export(tiny_model(in_channels=32), str(tmp_path / "e32"))
    torch.save({"mean": torch.zeros(16), "std": torch.ones(16)}, tmp_path / "stats.pt")
    assert sample.main([*base, "--export", str(tmp_path / "e32"), "--vae", "va-vae-f16d32", "--vae-weights", "v",
                        "--latent-stats", str(tmp_path / "stats.pt")]) == 2
    err = capsys.readouterr().err
    assert "latent stats have 16 mean / 16 std values, but va-vae-f16d32 latents have 32 channels" in err


@pytest.mark.slow  # a subprocess (killed) besides the in-process runs
def test_reproduce_end_to_end(files, tiny_preset, tmp_path, capsys):
    d = files
    # 1. random Inception weights are refused, in one line, before any sample is drawn
    out = tmp_path / "run"
    assert cli_reproduce.main(_argv(d, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not start with 6726825d" in err and "--allow-unverified-weights" in err
    assert not (out / "chunks").exists()
    # 2. with --allow-unverified-weights: samples.npz, samples.json, metrics.json
    assert cli_reproduce.main(_argv(d, out, "--allow-unverified-weights")) == 0
    smp = json.loads((out / "samples.json").read_text())
    assert smp["preset"] == NAME and smp["sampler"] == to_dict(TINY.sampler)
    assert smp["guidance"] == to_dict(TINY.guidance) and smp["guidance"]["interval_at"] == "step_start"
    assert (smp["vae"], smp["quantization"], smp["label_protocol"]) == ("sd-vae", "sit", "random")
    assert smp["source"] == {"checkpoint": str(d / "ckpt.pt"), "checkpoint_kind": "sit"}
    assert smp["model_config"]["hidden_size"] == 64 and smp["model_config"]["name"] == "SiT-S/2"
    fp = smp["fingerprints"]
    assert fp["checkpoint"]["sha256"] == _sha(d / "ckpt.pt") and "latent_stats" not in fp
    assert fp["vae_weights"]["files"] == {
        n: {"sha256": _sha(d / "vae" / n), "bytes": os.path.getsize(d / "vae" / n)}
        for n in ("config.json", "diffusion_pytorch_model.safetensors")}
    assert smp["provenance"]["igscale_version"] == version("igscale") and "git_commit" in smp["provenance"]
    m = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(m["fid"]) and m["num_samples"] == N and m["preset"] == NAME and m["expected_fid"] is None
    assert m["inception_verified"] is False and m["fingerprints"]["inception"]["verified"] is False
    for key, path in (("inception", d / WEIGHTS_FILENAME), ("ref", d / "ref.npz"), ("sample", out / "samples.npz"),
                      ("checkpoint", d / "ckpt.pt")):
        assert m["fingerprints"][key]["sha256"] == _sha(path), key
    assert "git_commit" in m["provenance"]
    with np.load(out / "samples.npz") as z:
        ref_imgs, ref_labels = z["arr_0"], z["arr_1"]
    assert ref_imgs.shape == (N, 64, 64, 3) and ref_imgs.std() > 1
    # 3. killed (SIGKILL) once its first chunks are stored, then rerun: bitwise the uninterrupted result
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AFTER_CHUNKS="2", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "tests.test_reproduce", "reproduce",
                        *_argv(d, killed, "--allow-unverified-weights")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    done = sorted(f for f in os.listdir(killed / "chunks") if f.endswith(".npz"))
    assert done == ["chunk_000000.npz", "chunk_000001.npz"] and not (killed / "samples.npz").exists()
    first = os.path.getmtime(killed / "chunks" / "chunk_000000.npz")
    capsys.readouterr()
    assert cli_reproduce.main(_argv(d, killed, "--allow-unverified-weights")) == 0
    log = capsys.readouterr().out
    assert "resuming" in log and not re.search(r"\] chunk 0 written", log)
    assert os.path.getmtime(killed / "chunks" / "chunk_000000.npz") == first
    with np.load(killed / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_1"], ref_labels)
        np.testing.assert_array_equal(z["arr_0"], ref_imgs)
    assert json.loads((killed / "metrics.json").read_text())["fid"] == m["fid"]


def _die_after_chunks(n: int) -> None:
    """SIGKILL this process right after its n-th chunk file is stored, as a preemption would."""
    from igscale.storage.local import LocalStorage

    put, stored = LocalStorage.put_bytes, []

    def put_bytes(self, key, data):
        put(self, key, data)
        if re.fullmatch(r"chunks/chunk_\d+\.npz", key):
            stored.append(key)
            if len(stored) == n:
                os.kill(os.getpid(), signal.SIGKILL)

    LocalStorage.put_bytes = put_bytes


if __name__ == "__main__":  # the resume test's subprocess: the tiny preset, then `igscale ARGS`
    from igscale.cli.main import main

    PRESETS[NAME] = TINY
    if int(os.environ.get("KILL_AFTER_CHUNKS", "0")):
        _die_after_chunks(int(os.environ["KILL_AFTER_CHUNKS"]))
    sys.exit(main(sys.argv[1:]))
