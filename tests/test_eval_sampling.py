"""Sampling job: identical images for any world size (fast default mode, fixed batch size) and any batch size
(batch-invariant mode), job identity per mode, exact resume after SIGKILL, S3 output.

Runs the real `igscale sample` CLI (single process and torchrun with 2 gloo ranks) on a tiny random-weight export.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.samplers import SamplerConfig
from igscale.distributed.env import DistEnv
from igscale.eval.export_io import load_export, save_export
from igscale.eval.generate import GenerationConfig, chunk_key, generate
from igscale.models import build_model

N, CHUNK = 40, 4
pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLER_ARGS = ["--method", "sde", "--num-steps", "12", "--w-cfg", "1.6", "--cfg-interval", "0", "0.7",
                "--w-ig", "1.4", "--ig-interval", "0.1", "1"]


def tiny_model(seed=0, num_classes=10, in_channels=3):
    torch.manual_seed(seed)
    m = build_model("SiT-S/2", input_size=8, in_channels=in_channels, hidden_size=64, depth=4, num_heads=2, ig_layers=(2,),
                    num_classes=num_classes)
    with torch.no_grad():  # non-zero heads and adaLN so every guidance term matters
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return m.eval()



@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny SD-VAE-latent model export and a tiny random SD-VAE (diffusers folder) to decode its samples."""
    from diffusers import AutoencoderKL

    from igscale.vae import VAE_KINDS

    d = tmp_path_factory.mktemp("export")
    save_export(tiny_model(in_channels=4), str(d / "export"))
    torch.manual_seed(0)
    AutoencoderKL(**dict(VAE_KINDS["sd-vae"], block_out_channels=(16, 16, 16, 16), norm_num_groups=8,
                         layers_per_block=1)).save_pretrained(d / "vae")
    return str(d / "export"), str(d / "vae")


def _env(tmp):
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def _cmd(export_vae, out, batch, nproc=1, extra=()):
    export, vae = export_vae
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return [*launcher, "-m", "igscale.cli.main", "sample", "--export", export, "--out", str(out),
            "--num-samples", str(N), "--chunk-size", str(CHUNK), "--batch-size", str(batch), "--seed", "7",
            "--vae", "sd-vae", "--vae-weights", vae, *SAMPLER_ARGS, *extra]


def _run(cmd, tmp):
    r = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _load(out):
    with np.load(os.path.join(out, "samples.npz")) as z:
        return z["arr_0"], z["arr_1"]


@pytest.fixture(scope="module")
def reference_run(export_dir, tmp_path_factory):
    """The CLI in its default (fast) mode, batch 4: (images, labels, output folder)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    _run(_cmd(export_dir, out, batch=4), out.parent)
    return (*_load(str(out)), out)


@pytest.mark.slow
def test_world_size_invariance(export_dir, reference_run, tmp_path):
    """Default (fast) mode, same batch size: 1 process vs 2 gloo ranks (torchrun), through the real VAE decode,
    give identical samples.npz."""
    imgs, labels, out = reference_run
    job = json.loads((out / "job.json").read_text())
    assert job["batch_invariant"] is False and job["batch_size"] == 4  # the CLI default, batch size recorded
    assert imgs.shape == (N, 64, 64, 3) and imgs.dtype == np.uint8 and labels.shape == (N,)
    assert imgs.std() > 1 and len(np.unique(labels)) > 3  # not a degenerate output
    assert len({imgs[i].tobytes() for i in range(N)}) == N
    _run(_cmd(export_dir, tmp_path / "w2", batch=4, nproc=2), tmp_path)
    imgs2, labels2 = _load(str(tmp_path / "w2"))
    np.testing.assert_array_equal(labels2, labels)
    np.testing.assert_array_equal(imgs2, imgs)


@pytest.mark.slow
def test_resume_after_sigkill(export_dir, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(export_dir, out, batch=4), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    chunks = out / "chunks"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if chunks.is_dir() and any(p.suffix == ".npz" for p in chunks.iterdir()):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in chunks.iterdir() if p.suffix == ".npz")
    assert 0 < len(done_before) < N // CHUNK, done_before
    assert not (out / "samples.npz").exists()
    # rerun with another world size; only missing chunks may be generated
    log = _run(_cmd(export_dir, out, batch=4, nproc=2), tmp_path)
    # ranks share stdout, so lines may interleave: match anywhere in the log
    rewritten = {f"chunk_{int(k):06d}.npz" for k in re.findall(r"\] chunk (\d+) written", log)}
    assert rewritten.isdisjoint(done_before)
    assert sorted(rewritten | set(done_before)) == [f"chunk_{k:06d}.npz" for k in range(N // CHUNK)]
    imgs, labels = _load(str(out))  # fast mode: same batch size as the reference, other world size
    np.testing.assert_array_equal(labels, reference_run[1])
    np.testing.assert_array_equal(imgs, reference_run[0])


def _raw(lat):  # expose the float32 bits as uint8 "pixels" so nothing is hidden by quantisation
    return lat.permute(0, 2, 3, 1).contiguous().numpy().view(np.uint8)


def _raw_run(out, batch, envs, model, invariant=False):
    sampler = SamplerConfig(method="heun", num_steps=4)
    guidance = GuidanceConfig(w_cfg=2.0, cfg_interval=(0.3, 0.9), w_ig=1.5)
    cfg = GenerationConfig(num_samples=12, seed=3, chunk_size=3, batch_size=batch, labels="random",
                           batch_invariant=invariant)
    for env in envs:  # ranks run one after another here; their chunk sets are disjoint
        generate(model, _raw, cfg, sampler, guidance, str(out), env, settings={}, log=lambda s: None)
    return np.concatenate([np.load(os.path.join(out, chunk_key(k)))["arr_0"] for k in range(4)])


def test_bitwise_latents_independent_of_world_size(tmp_path):
    """Default (fast) mode at a fixed per-rank batch: the float32 latent bits do not depend on the world size."""
    model = tiny_model(seed=1)
    one = _raw_run(tmp_path / "w1", 2, [DistEnv()], model)
    three = _raw_run(tmp_path / "w3", 2, [DistEnv(rank=r, world_size=3) for r in range(3)], model)
    np.testing.assert_array_equal(one, three)


def test_bitwise_latents_independent_of_batch(tmp_path):
    """Batch-invariant mode: the float32 latent bits do not depend on the batch size (1 vs 3)."""
    model = tiny_model(seed=1)
    np.testing.assert_array_equal(_raw_run(tmp_path / "b1", 1, [DistEnv()], model, invariant=True),
                                  _raw_run(tmp_path / "b3", 3, [DistEnv()], model, invariant=True))


def _recording(decode, sizes):
    def rec(lat):
        sizes.append(lat.shape[0])
        return decode(lat)
    return rec


def test_batch_invariant_rerun_with_other_batch_size_pixels(export_dir, tmp_path):
    """Batch-invariant mode through the real VAE: a folder half done with batch 4 is completed with batch 3 (accepted:
    batch_size is not part of its identity), and every chunk is bitwise equal to an uninterrupted batch-4 run."""
    import argparse

    from igscale.eval.setup import build_decoder, sampler_from_args

    args = argparse.Namespace(vae="sd-vae", vae_weights=export_dir[1], quantization=None, latent_scale=0.18215,
                              latent_stats=None, preset=None, method="sde", num_steps=12, shift=None, w_cfg=1.6,
                              cfg_interval=[0.0, 0.7], w_ig=1.4, ig_interval=[0.1, 1.0])
    decode, _ = build_decoder(args, "cpu")
    sampler, guidance = sampler_from_args(args)
    model, n = load_export(export_dir[0]), 4 * CHUNK
    ref, part = tmp_path / "ref", tmp_path / "part"
    sizes = []
    cfg4 = GenerationConfig(num_samples=n, seed=7, chunk_size=CHUNK, batch_size=4, batch_invariant=True)
    generate(model, _recording(decode, sizes), cfg4, sampler, guidance, str(ref), DistEnv(), settings={},
             log=lambda s: None)
    assert set(sizes) == {1}  # the VAE decodes one image at a time in this mode
    assert "batch_size" not in json.loads((ref / "job.json").read_text())
    (part / "chunks").mkdir(parents=True)
    shutil.copy(ref / "job.json", part / "job.json")
    for k in (0, 2):  # the chunks rank 0 of 2 would have written before a preemption
        shutil.copy(ref / chunk_key(k), part / chunk_key(k))
    cfg3 = GenerationConfig(num_samples=n, seed=7, chunk_size=CHUNK, batch_size=3, batch_invariant=True)
    written = generate(model, decode, cfg3, sampler, guidance, str(part), DistEnv(), settings={}, log=lambda s: None)
    assert written == [1, 3]  # batches of 3 + 1 per chunk
    for k in range(4):
        a, b = np.load(ref / chunk_key(k))["arr_0"], np.load(part / chunk_key(k))["arr_0"]
        assert a.shape == (CHUNK, 64, 64, 3) and a.std() > 1
        np.testing.assert_array_equal(b, a)


def test_fast_mode_rerun_with_other_batch_size_is_refused(tmp_path):
    """Default (fast) mode records batch_size in job.json: another batch size is refused, another world size is not."""
    model = tiny_model()
    sampler = SamplerConfig(method="euler", num_steps=2)
    cfg = GenerationConfig(num_samples=6, chunk_size=3, batch_size=2)
    assert cfg.batch_invariant is False  # the default
    out, sizes = str(tmp_path / "o"), []
    generate(model, _recording(_raw, sizes), cfg, sampler, GuidanceConfig(), out, DistEnv(rank=0, world_size=2),
             settings={}, log=lambda m: None)
    assert sizes == [2, 1]  # one batched decode per batch (chunk 0 = samples 0..2)
    assert json.loads((tmp_path / "o" / "job.json").read_text())["batch_size"] == 2
    other = GenerationConfig(num_samples=6, chunk_size=3, batch_size=3)
    with pytest.raises(ValueError, match=r"differ in \['batch_size'\]\); fast mode fixes batch_size .*batch_size=2;"):
        generate(model, _raw, other, sampler, GuidanceConfig(), out, DistEnv(), settings={}, log=lambda m: None)
    inv = GenerationConfig(num_samples=6, chunk_size=3, batch_size=2, batch_invariant=True)
    mixed = r"differ in \['batch_invariant', 'batch_size'\]\); the folder was made with batch_invariant=False"
    with pytest.raises(ValueError, match=mixed):  # never mix modes in one folder
        generate(model, _raw, inv, sampler, GuidanceConfig(), out, DistEnv(), settings={}, log=lambda m: None)
    # same batch size on one rank instead of two: accepted, only the missing chunk is generated
    assert generate(model, _raw, cfg, sampler, GuidanceConfig(), out, DistEnv(), settings={},
                    log=lambda m: None) == [1]


def test_cli_batch_mode_flags():
    from igscale.cli import sample as cli_sample
    from igscale.cli import sweep as cli_sweep

    base = ["--out", "o", "--export", "e"]
    sweep = [*base, "--ref", "r.npz", "--inception", "w.pth"]
    for parser, argv in ((cli_sample.build_parser(), base), (cli_sweep.build_parser(), sweep)):
        assert parser.parse_args(argv).batch_invariant is False
        assert parser.parse_args([*argv, "--batch-invariant"]).batch_invariant is True
        assert parser.parse_args([*argv, "--no-batch-invariant"]).batch_invariant is False  # old spelling


def test_rerun_with_other_settings_is_refused(tmp_path):
    model = tiny_model()
    cfg = GenerationConfig(num_samples=2, chunk_size=2, batch_size=2)
    out = str(tmp_path / "o")
    s = SamplerConfig(method="euler", num_steps=2)
    generate(model, lambda x: np.zeros((len(x), 1, 1, 3), np.uint8), cfg, s, GuidanceConfig(), out, DistEnv(),
             settings={}, log=lambda m: None)
    with pytest.raises(ValueError, match=r"different job .*guidance"):
        generate(model, lambda x: x, cfg, s, GuidanceConfig(w_ig=2.0), out, DistEnv(), settings={})


@pytest.mark.slow
def test_export_and_samples_on_s3(s3_bucket, tmp_path, s3_server):
    url = f"s3://{s3_bucket}/exp"
    save_export(tiny_model(), url + "/export")
    assert load_export(url + "/export").config.hidden_size == 64
    env = {**_env(tmp_path), **s3_server.env}
    cmd = [sys.executable, "-m", "igscale.cli.main", "sample", "--export", url + "/export", "--out", url + "/samples",
           "--num-samples", "6", "--chunk-size", "4", "--batch-size", "4", "--method", "euler", "--num-steps", "3",
           "--labels", "balanced"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: balanced labels need num_samples divisible" in r.stderr  # 6 % 10
    cmd[cmd.index("6")] = "20"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    from igscale.storage import open_storage

    store = open_storage(url + "/samples")
    store.get_file("samples.npz", tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (20, 8, 8, 3)
        np.testing.assert_array_equal(np.bincount(z["arr_1"]), np.full(10, 2))
    assert '"label_protocol": "balanced"' in store.get_text("samples.json")


def test_cli_model_input_errors(tmp_path, capsys, export_dir):
    from igscale.cli import sample as cli_sample

    base = ["--out", str(tmp_path / "o"), "--num-samples", "2", "--method", "euler", "--num-steps", "1"]
    assert cli_sample.main(base + ["--checkpoint", str(tmp_path / "nope.pt"), "--model", "SiT-S/2",
                                   "--checkpoint-kind", "sit"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli_sample.main(base + ["--export", export_dir[0], "--checkpoint", "x.pt"]) == 2
    assert "exactly one of --export" in capsys.readouterr().err
    assert cli_sample.main(base + ["--export", str(tmp_path / "none")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert cli_sample.main(base + ["--export", export_dir[0], "--vae", "sd-vae"]) == 2
    assert "needs --vae-weights" in capsys.readouterr().err


def test_damaged_chunks_are_named_and_regenerated(tmp_path):
    """A truncated chunk is regenerated on rerun; a chunk whose bytes differ from its record fails the assembly
    with its name and is deleted, so the next rerun regenerates it; a killed writer's temp file is removed."""
    from igscale.eval.generate import assemble

    model = tiny_model()
    out = tmp_path / "job"
    ref = _raw_run(out, 2, [DistEnv()], model)
    logs = []
    cfg = GenerationConfig(num_samples=12, seed=3, chunk_size=3, batch_size=2, labels="random")
    sampler, guidance = SamplerConfig(method="heun", num_steps=4), GuidanceConfig(w_cfg=2.0, cfg_interval=(0.3, 0.9),
                                                                                   w_ig=1.5)
    path = out / chunk_key(1)
    path.write_bytes(path.read_bytes()[:100])  # truncated by something outside igscale
    (out / "chunks" / ".chunk_000002.npz.abc.tmp").write_bytes(b"partial")
    written = generate(model, _raw, cfg, sampler, guidance, str(out), DistEnv(), settings={}, log=logs.append)
    assert written == [1] and any("damaged or incomplete" in s for s in logs)
    assert not list((out / "chunks").glob(".*.tmp"))
    got = np.concatenate([np.load(out / chunk_key(k))["arr_0"] for k in range(4)])
    np.testing.assert_array_equal(got, ref)
    data = bytearray((out / chunk_key(2)).read_bytes())  # same size, one byte flipped: only the hash can tell
    data[-40] ^= 0xFF
    (out / chunk_key(2)).write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"chunk_000002.npz is damaged .* rerun"):
        assemble(str(out), cfg, {}, log=lambda s: None)
    assert not (out / chunk_key(2)).exists()
    assert generate(model, _raw, cfg, sampler, guidance, str(out), DistEnv(), settings={}, log=logs.append) == [2]
    assemble(str(out), cfg, {}, log=lambda s: None)
    np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_0"], ref)


def test_reexported_weights_at_the_same_url_do_not_extend_a_job(tmp_path):
    """The job identity holds a content hash of the weights, not only the export URL."""
    import argparse

    from igscale.eval.setup import load_model

    export, out = tmp_path / "export", tmp_path / "job"
    ns = argparse.Namespace(export=str(export), checkpoint=None, model=None, checkpoint_kind=None)
    cfg = GenerationConfig(num_samples=4, seed=0, chunk_size=2, batch_size=2)
    sampler, guidance = SamplerConfig(method="euler", num_steps=2), GuidanceConfig()
    save_export(tiny_model(seed=0), str(export))
    model, meta = load_model(ns)
    generate(model, _raw, cfg, sampler, guidance, str(out), DistEnv(), settings=meta, log=lambda s: None)
    save_export(tiny_model(seed=1), str(export))  # other weights, same URL and config
    model, meta2 = load_model(ns)
    assert meta2["source"] == meta["source"] and meta2["weights_sha256"] != meta["weights_sha256"]
    with pytest.raises(ValueError, match="weights_sha256"):
        generate(model, _raw, cfg, sampler, guidance, str(out), DistEnv(), settings=meta2, log=lambda s: None)


def test_random_label_job_extends_to_more_samples_and_equals_a_fresh_job(tmp_path):
    """num_samples is not part of a random-label job's identity: a folder grows, reusing every full chunk and
    regenerating the last chunk the old count cut short; the result equals a fresh job bitwise (the basis of
    `igscale tune`). Balanced labels keep the count in the identity."""
    from igscale.eval.generate import assemble

    model, sampler, g = tiny_model(), SamplerConfig(method="euler", num_steps=2), GuidanceConfig(w_ig=1.5)
    small, big = (GenerationConfig(num_samples=n, seed=5, chunk_size=3, batch_size=2) for n in (5, 9))
    grown, fresh = str(tmp_path / "grown"), str(tmp_path / "fresh")
    kw = dict(settings={}, log=lambda m: None)
    assert generate(model, _raw, small, sampler, g, grown, DistEnv(), **kw) == [0, 1]
    assert generate(model, _raw, big, sampler, g, grown, DistEnv(), **kw) == [1, 2]  # chunk 1 held only [3, 5)
    assert generate(model, _raw, big, sampler, g, fresh, DistEnv(), **kw) == [0, 1, 2]
    for out in (grown, fresh):
        assemble(out, big, {}, log=lambda m: None)
    a, b = _load(grown), _load(fresh)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assemble(grown, small, {}, log=lambda m: None)  # a smaller count assembles the prefix
    np.testing.assert_array_equal(_load(grown)[0], b[0][:5])
    assert generate(model, _raw, small, sampler, g, grown, DistEnv(), **kw) == []  # nothing to regenerate
    bal = str(tmp_path / "bal")
    generate(model, _raw, GenerationConfig(num_samples=10, chunk_size=5, batch_size=5, labels="balanced"),
             sampler, g, bal, DistEnv(), **kw)
    with pytest.raises(ValueError, match=r"differ in \['num_samples'\]"):
        generate(model, _raw, GenerationConfig(num_samples=20, chunk_size=5, batch_size=5, labels="balanced"),
                 sampler, g, bal, DistEnv(), **kw)
