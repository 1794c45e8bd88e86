"""`igscale demo`: the whole product at toy scale on CPU, with embedded defaults, in a few minutes.

1. start a local S3 server (SeaweedFS) on 127.0.0.1 and write a generated labelled image set to it (no download);
2. train the demo's own f8 autoencoder (diffusers AutoencoderKL, SD-VAE structure) on those images and save it on
   S3 in the SD-VAE release layout;
3. precompute its latents with the Ray job into WebDataset shards on S3;
4. train a small SiT+IG with DeepSpeed ZeRO-2 on 2 processes (torchrun/gloo), TensorBoard logs, checkpoints on S3;
5. export the EMA weights, then sample no guidance / IG / CFG / CFG+IG with shared seeds on 2 processes;
6. score them with a feature network trained on the toy classes (Frechet distance, precision/recall, label
   accuracy, against held-out images), and run the Inception evaluation path once (random weights: a code check);
7. write the labelled sample grid, print where everything is and how long each stage took, stop the S3 server.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

BUCKET = "igscale-demo"
RESOLUTION = 64
W_IG, W_CFG = 2.0, 2.0
SETTINGS = {(1.0, 1.0): "none", (W_IG, 1.0): "IG", (1.0, W_CFG): "CFG", (W_IG, W_CFG): "CFG+IG"}

# Embedded training config, written into the run folder: a SiT-S/2 shape shrunk to the demo's 8x8x4 latents and
# 4 toy classes (wider and deeper than configs/tiny_cpu.yaml, which sizes the tests).
TRAIN_CONFIG = {
    "model": {"name": "SiT-S/2", "input_size": 8, "in_channels": 4, "hidden_size": 96, "depth": 6, "num_heads": 4,
              "num_classes": 4, "ig_layers": [2]},
    "data": {"num_workers": 1, "shuffle_buffer": 256},
    "loss": {"path": "linear", "aux_weight": 0.5, "t_sampling": "uniform", "label_dropout": 0.1},
    "optim": {"name": "adamw", "lr": 2.0e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_steps": 50},
    "engine": {"zero_stage": 2, "precision": "fp32", "grad_accum": 1, "grad_clip": 1.0},
    "train": {"global_batch": 64, "seed": 0, "ema_decay": 0.99},
    "checkpoint": {"keep_last": 2},
    "sample": {"num": 4, "num_steps": 8, "method": "euler", "w_cfg": 1.0, "w_ig": W_IG},
    "logging": {"every_steps": 50},
}


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Stages:
    """Wall time of each named stage, announced as it starts and ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        _say(f"== {name}")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        _say(f"== {name} done in {self.seconds[name]:.1f} s")


def _run(cmd: list[str], env: dict, log: Path) -> None:
    """Run a stage as its own process (as on a cluster); its output goes to `log`, the tail to the console on error."""
    _say("$ " + " ".join(cmd))
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"stage failed with exit code {rc}: {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


def _free_port() -> int:
    from igscale.demo.local_s3 import free_ports

    return free_ports(1)[0]


def _vae_round_trip(images: np.ndarray, vae_url: str) -> np.ndarray:
    """real -> encode -> decode through the production VAE path, with the weights as stored on S3."""
    import torch

    from igscale.vae import build_vae, decode_to_uint8, encode

    vae = build_vae("sd-vae", vae_url)
    mean, _ = encode(vae, torch.from_numpy(images))
    return decode_to_uint8(vae, mean, quantization="sit").cpu().numpy()


def _parse(argv):
    ap = argparse.ArgumentParser(prog="igscale demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo", help="everything the demo writes goes here (default runs/demo)")
    ap.add_argument("--per-class", type=int, default=256, help="training images per class (4 classes)")
    ap.add_argument("--held-out", type=int, default=64, help="held-out reference images per class")
    ap.add_argument("--ae-steps", type=int, default=300, help="autoencoder training steps (batch 16)")
    ap.add_argument("--steps", type=int, default=600, help="diffusion training steps (global batch 64)")
    ap.add_argument("--num-samples", type=int, default=128, help="samples per guidance setting")
    ap.add_argument("--inception-images", type=int, default=32,
                    help="images through the (random-weight) Inception code-path check")
    a = ap.parse_args(argv)
    for k in ("per_class", "held_out", "ae_steps", "steps", "num_samples", "inception_images"):
        if getattr(a, k) < (4 if k in ("held_out", "num_samples") else 1):
            ap.error(f"--{k.replace('_', '-')} is too small: {getattr(a, k)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    t_start = time.time()
    work = Path(a.workdir).resolve()
    if work.exists():
        _say(f"removing the previous demo output in {work}")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir()
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    stage = _Stages()

    from igscale.demo.local_s3 import start_s3_server

    with stage("S3 server"):
        s3 = start_s3_server(work / "s3")
    _say(f"S3 endpoint {s3.endpoint_url} (pid {s3.pid})")
    # Ray's unix socket paths must stay under 108 bytes, so its session folder cannot live under a deep --workdir
    ray_tmp = tempfile.mkdtemp(prefix="igscale-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        env = dict(os.environ, **s3.env, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                   RAY_TMPDIR=ray_tmp, TMPDIR=str(work / "tmp"), OMP_NUM_THREADS="1",
                   TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"), PYTHONUNBUFFERED="1")
        (work / "tmp").mkdir()
        os.environ.update(s3.env)
        s3.create_bucket(BUCKET)
        root = f"s3://{BUCKET}"
        vae_url = f"{root}/weights/vae"
        summary = _stages(a, stage, work, logs, root, vae_url, env, py, torchrun)
        summary["wall_s"] = time.time() - t_start
        summary["stages_s"] = stage.seconds
        (work / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary, work, root, logs, s3)
    finally:
        _say(f"stopping the S3 server (pid {s3.pid})")
        s3.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return 0


def _stages(a, stage, work, logs, root, vae_url, env, py, torchrun) -> dict:
    import torch

    from igscale.demo.toy import CLASSES, toy_arrays
    from igscale.storage import open_storage

    with stage("images"):
        train_x, train_y = toy_arrays(a.per_class, RESOLUTION, seed=0,  # decoded and cropped as the pipeline will
                                      store=open_storage(f"{root}/images"))
        n = len(train_x)
        held_x, held_y = toy_arrays(a.held_out, RESOLUTION, seed=1)
        np.savez(work / "heldout_images.npz", arr_0=held_x, arr_1=held_y)
    _say(f"{n} toy images in {root}/images; {len(held_x)} held-out images for the reference")

    with stage("autoencoder"):
        from igscale.demo.autoencoder import heldout_mse, train_autoencoder
        from igscale.demo.weights import save_vae

        torch.set_num_threads(2)
        vae, _ = train_autoencoder(train_x, steps=a.ae_steps, log=_say)
        save_vae(vae, open_storage(vae_url))
        ae = heldout_mse(vae, held_x[::4])
    _say(f"autoencoder saved to {vae_url}: held-out reconstruction MSE {ae['trained']:.4f}, "
         f"{ae['ratio']:.1f}x lower than the same network with random weights ({ae['random']:.4f})")

    with stage("precompute (Ray)"):
        _run([py, "-m", "data_pipeline.run", "--executor", "ray", "--input", f"{root}/images",
              "--output", f"{root}/latents", "--vae-kind", "sd-vae", "--vae-weights", vae_url,
              "--resolution", str(RESOLUTION), "--mode", "mean_std", "--samples-per-shard", str(max(1, min(128, n // 8))),
              "--batch-size", "64", "--max-workers", "2", "--shard-order", "shuffled"], env, logs / "precompute.log")
    manifest = json.loads(open_storage(f"{root}/latents").get_bytes("manifest.json"))
    _say(f"latents: {manifest.get('num_samples', '?')} samples in {len(manifest.get('shards', []))} shards")

    import yaml

    cfg = json.loads(json.dumps(TRAIN_CONFIG))
    cfg["run_dir"] = str(work / "train")
    cfg["data"]["manifest_url"] = f"{root}/latents/manifest.json"
    cfg["checkpoint"].update(url=f"{root}/checkpoints", every_steps=max(1, a.steps // 2))
    cfg["train"]["total_steps"] = a.steps
    cfg["sample"]["every_steps"] = a.steps
    cfg_path = work / "train_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with stage("train (DeepSpeed, 2 processes)"):
        _run(torchrun + ["--master_port", str(_free_port()), "-m", "igscale.cli.train", "--config", str(cfg_path)],
             env, logs / "train.log")
    with stage("export"):
        _run([py, "-m", "igscale.cli.main", "export", "--checkpoint", f"{root}/checkpoints", "--out",
              f"{root}/export"], env, logs / "export.log")

    sweep = f"{root}/sweep"
    with stage("sample (2 processes)"):
        _run(torchrun + ["--master_port", str(_free_port()), "-m", "igscale.cli.main", "sweep", "--no-score",
                         "--export", f"{root}/export", "--vae", "sd-vae", "--vae-weights", vae_url,
                         "--method", "heun", "--num-steps", "12", "--num-samples", str(a.num_samples),
                         "--labels", "balanced", "--chunk-size", "64", "--batch-size", "64",
                         "--w-ig", "1", str(W_IG), "--w-cfg", "1", str(W_CFG),
                         "--out", sweep], env, logs / "sample.log")
    points = json.loads(open_storage(sweep).get_text("sweep.json"))["rows"]
    samples = {}
    for p in points:  # a local copy of each setting's samples.npz, next to the grid
        name = SETTINGS[(p["w_ig"], p["w_cfg"])]
        local = work / f"samples_{name.replace('+', '_').lower()}.npz"
        open_storage(f"{sweep}/{p['point']}").get_file("samples.npz", str(local))
        with np.load(local) as z:
            samples[name] = (z["arr_0"], z["arr_1"])
    samples = {k: samples[k] for k in SETTINGS.values()}

    with stage("score (toy features)"):
        from igscale.demo.features import score_samples, train_shape_net

        net = train_shape_net(train_x, train_y)
        metrics = {name: score_samples(net, held_x, x, y) for name, (x, y) in samples.items()}
        # the floor: one half of the held-out images (every other one, so every class) scored against the other
        metrics["real"] = score_samples(net, held_x[0::2], held_x[1::2], held_y[1::2])
    with stage("Inception code path"):
        inception = _inception_check(work, logs, env, py, held_x, samples["CFG+IG"][0], a.inception_images)

    with stage("grid"):
        from igscale.demo.report import pick_columns, write_grid

        cols = pick_columns(held_y, len(CLASSES))
        scols = pick_columns(samples["none"][1], len(CLASSES))
        rows = [("real", held_x[cols]), ("real->VAE", _vae_round_trip(held_x[cols], vae_url))]
        rows += [(name, x[scols]) for name, (x, _) in samples.items()]
        grid = work / "sample_grid.png"
        write_grid(rows, [CLASSES[c].split("_")[1] for c in np.repeat(np.arange(len(CLASSES)), 2)], grid)

    log = [json.loads(line) for line in (work / "train" / "train_log.jsonl").read_text().splitlines() if line]
    return {"images": n, "num_samples": a.num_samples, "autoencoder": ae, "metrics": metrics,
            "inception_code_path": inception, "grid": str(grid),
            "sweep": sweep, "guidance": {"w_ig": W_IG, "w_cfg": W_CFG},
            "loss": [log[0]["train/loss"], log[-1]["train/loss"]] if log else None}


def _inception_check(work, logs, env, py, real, fake, n) -> dict:
    """`igscale eval` on n held-out images against n CFG+IG samples, with random Inception weights written in the
    published file's layout: the evaluation code path end to end, not a FID."""
    import torch

    from igscale.demo.weights import random_published_state
    from igscale.eval.inception import WEIGHTS_FILENAME

    inc = work / "inception_random"
    inc.mkdir()
    torch.save(random_published_state(0), inc / WEIGHTS_FILENAME)
    np.savez(work / "inception_ref.npz", arr_0=real[:n])  # statistics are computed from arr_0, as ADM does
    np.savez(work / "inception_samples.npz", arr_0=fake[:n])
    out = work / "metrics_inception_code_path.json"
    _run([py, "-m", "igscale.cli.main", "eval", str(work / "inception_ref.npz"), str(work / "inception_samples.npz"),
          "--inception", str(inc), "--allow-unverified-weights", "--batch-size", "16", "--out", str(out)],
         dict(env, OMP_NUM_THREADS="2"), logs / "eval_inception.log")
    return json.loads(out.read_text())


def _print_summary(s: dict, work: Path, root: str, logs: Path, s3) -> None:
    from igscale.demo.report import metric_table

    bar = "=" * 100
    print("\n" + bar)
    print(f"igscale demo finished in {s['wall_s']:.0f} s. Everything is under {work}")
    print(f"  images (S3)        {root}/images  ({s['images']} toy images, 4 classes)")
    print(f"  autoencoder (S3)   {root}/weights/vae  (trained here; held-out MSE {s['autoencoder']['trained']:.4f}, "
          f"{s['autoencoder']['ratio']:.1f}x below random weights)")
    print(f"  latents (S3)       {root}/latents/manifest.json  (Ray job)")
    print(f"  checkpoints (S3)   {root}/checkpoints   export: {root}/export   samples: {s['sweep']}/point_*")
    print(f"  TensorBoard        tensorboard --logdir {work / 'train' / 'tensorboard'} --host 127.0.0.1")
    if s["loss"]:
        print(f"  training loss      {s['loss'][0]:.4f} -> {s['loss'][1]:.4f}")
    print(f"  sample grid        {s['grid']}")
    print(f"  logs               {logs}")
    g = s["guidance"]
    print(f"\n  guidance: IG w_ig={g['w_ig']}, CFG w_cfg={g['w_cfg']} (both on the whole trajectory), Heun 12 steps "
          "for every setting (23 velocity evaluations; CFG's run on a doubled batch)")
    print("  metrics on a feature network trained on the toy classes, against held-out real images")
    print("  (fd: Frechet distance, lower is better; accuracy: samples classified as their conditioning label):")
    for line in metric_table(s["metrics"], ("fd", "precision", "recall", "accuracy")):
        print("    " + line)
    m = s["metrics"]
    verdict = "IG helps" if m["IG"]["fd"] < m["none"]["fd"] and m["CFG+IG"]["fd"] < m["CFG"]["fd"] else \
        "IG does NOT lower the Frechet distance at this scale in every pairing"
    print(f"  {verdict}: fd none {m['none']['fd']:.3f} -> IG {m['IG']['fd']:.3f}; "
          f"CFG {m['CFG']['fd']:.3f} -> CFG+IG {m['CFG+IG']['fd']:.3f}")
    noise = (0.25 / s["num_samples"]) ** 0.5  # the largest binomial standard error of an accuracy over n samples
    print(f"  label accuracy: none {m['none']['accuracy']:.3f} -> IG {m['IG']['accuracy']:.3f}; CFG "
          f"{m['CFG']['accuracy']:.3f} -> CFG+IG {m['CFG+IG']['accuracy']:.3f} (sampling noise up to "
          f"+-{noise:.3f} at {s['num_samples']} samples per setting)")
    inc = s["inception_code_path"]
    print("  Inception evaluation path (RANDOM-WEIGHT Inception, a code-path check, not a FID): " + ", ".join(
        f"{k} {inc[k]:.3f}" for k in ("fid", "sfid", "inception_score", "precision", "recall") if k in inc))
    print("\n  stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in s["stages_s"].items()))
    print(f"  the S3 server is stopped now; its data stays in {s3.data_dir}")
    print(bar)


if __name__ == "__main__":
    sys.exit(main())
