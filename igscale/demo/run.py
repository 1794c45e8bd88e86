"""`igscale demo`: the whole product at toy scale on CPU, with embedded defaults, in a few minutes.

1. start a local S3 server (SeaweedFS) on 127.0.0.1;
2. write a procedurally generated labelled image set (igscale.demo.toy, no download) to S3;
3. precompute VAE latents with the Ray job into WebDataset shards on S3 (random-weight f8 VAE, labelled as such);
4. train a tiny SiT+IG with DeepSpeed ZeRO-2 on 2 processes (torchrun/gloo), TensorBoard logs, checkpoints on S3;
5. export the EMA weights and sample with IG and with CFG+IG on 2 processes;
6. score both sample sets with the evaluation code path (random-weight Inception: the numbers only exercise the code);
7. write a sample-grid PNG, print where everything is, and stop the S3 server by PID.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BUCKET = "igscale-demo"

# Embedded training config, written into the run folder: a SiT-S/2 shape shrunk to the demo's 8x8x4 latents and
# 4 toy classes (wider and deeper than configs/tiny_cpu.yaml, which sizes the tests).
TRAIN_CONFIG = {
    "model": {"name": "SiT-S/2", "input_size": 8, "in_channels": 4, "hidden_size": 96, "depth": 6, "num_heads": 4,
              "num_classes": 4, "ig_layers": [2]},
    "data": {"num_workers": 1, "shuffle_buffer": 64},
    "loss": {"path": "linear", "aux_weight": 0.5, "t_sampling": "uniform", "label_dropout": 0.1},
    "optim": {"name": "adamw", "lr": 1.0e-3, "betas": [0.9, 0.999], "weight_decay": 0.0},
    "engine": {"zero_stage": 2, "precision": "fp32", "grad_accum": 1, "grad_clip": 1.0},
    "train": {"global_batch": 32, "seed": 0, "ema_decay": 0.99},
    "checkpoint": {"keep_last": 2},
    "sample": {"num": 4, "num_steps": 8, "method": "euler", "w_cfg": 1.0, "w_ig": 1.4},
    "logging": {"every_steps": 10},
}


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def _real_images_npz(store, out: Path, size: int) -> int:
    """ADM-cropped real images (uint8 NHWC) for the reference batch."""
    import io

    from PIL import Image

    from data_pipeline.crop import center_crop_adm

    imgs = []
    for key in store.list(""):
        img = Image.open(io.BytesIO(store.get_bytes(key))).convert("RGB")
        imgs.append(np.asarray(center_crop_adm(img, size)))
    np.savez(out, arr_0=np.stack(imgs))
    return len(imgs)


def _vae_round_trip(images: np.ndarray, vae_url: str) -> np.ndarray:
    """real -> encode -> decode with the demo's VAE, to show what the (random-weight) VAE itself does to pixels."""
    import torch

    from igscale.vae import build_vae, decode_to_uint8, encode

    vae = build_vae("sd-vae", vae_url)
    mean, _ = encode(vae, torch.from_numpy(images))
    return decode_to_uint8(vae, mean, quantization="sit").cpu().numpy()


def _grid(npzs: list[tuple[str, Path]], real: Path, out: Path, vae_url: str, per_row: int = 8) -> None:
    from PIL import Image, ImageDraw

    reals = np.load(real)["arr_0"][::12][:per_row]
    rows = [("real", reals), ("real->VAE", _vae_round_trip(reals, vae_url))]
    rows += [(name, np.load(p)["arr_0"][:per_row]) for name, p in npzs]
    s = rows[0][1].shape[1]
    label_w = 90
    canvas = Image.new("RGB", (label_w + per_row * s, len(rows) * s), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, arr) in enumerate(rows):
        draw.text((4, r * s + s // 2 - 5), name, fill="black")
        for c, img in enumerate(arr):
            canvas.paste(Image.fromarray(img), (label_w + c * s, r * s))
    canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
    canvas.save(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="igscale demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo", help="everything the demo writes goes here (default runs/demo)")
    ap.add_argument("--steps", type=int, default=150, help="training steps (global batch 32)")
    ap.add_argument("--num-samples", type=int, default=64, help="samples per guidance setting")
    ap.add_argument("--per-class", type=int, default=24, help="toy images per class (4 classes)")
    a = ap.parse_args(argv)
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

    from igscale.demo.local_s3 import start_s3_server
    from igscale.storage import open_storage

    _say("starting SeaweedFS (S3) on 127.0.0.1")
    s3 = start_s3_server(work / "s3")
    _say(f"S3 endpoint {s3.endpoint_url} (pid {s3.pid})")
    try:
        env = dict(os.environ, **s3.env, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                   RAY_TMPDIR=str(work / "ray"), TMPDIR=str(work / "tmp"), OMP_NUM_THREADS="1",
                   TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"), PYTHONUNBUFFERED="1")
        (work / "ray").mkdir()
        (work / "tmp").mkdir()
        os.environ.update(s3.env)
        s3.create_bucket(BUCKET)
        root = f"s3://{BUCKET}"

        # 2. data ------------------------------------------------------------------------------------------------
        from igscale.demo.toy import write_toy_tree
        from igscale.demo.weights import save_random_vae

        n = write_toy_tree(open_storage(f"{root}/images"), per_class=a.per_class)
        save_random_vae(open_storage(f"{root}/weights/vae"), "sd-vae", (32, 32, 64, 64))
        _say(f"wrote {n} toy images to {root}/images and a random-weight f8 VAE to {root}/weights/vae")

        # 3. latents with Ray -------------------------------------------------------------------------------------
        _run([py, "-m", "data_pipeline.run", "--executor", "ray", "--input", f"{root}/images",
              "--output", f"{root}/latents", "--vae-kind", "sd-vae", "--vae-weights", f"{root}/weights/vae",
              "--resolution", "64", "--mode", "mean_std", "--samples-per-shard", "32", "--batch-size", "16",
              "--max-workers", "2", "--shard-order", "shuffled"], env, logs / "precompute.log")
        manifest = json.loads(open_storage(f"{root}/latents").get_bytes("manifest.json"))
        _say(f"latents: {manifest.get('num_samples', '?')} samples in {len(manifest.get('shards', []))} shards")

        # 4. train with DeepSpeed on 2 processes ------------------------------------------------------------------
        import yaml

        cfg = json.loads(json.dumps(TRAIN_CONFIG))
        cfg["run_dir"] = str(work / "train")
        cfg["data"]["manifest_url"] = f"{root}/latents/manifest.json"
        cfg["checkpoint"].update(url=f"{root}/checkpoints", every_steps=max(1, a.steps // 2))
        cfg["train"]["total_steps"] = a.steps
        cfg["sample"]["every_steps"] = a.steps
        cfg_path = work / "train_config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        _run(torchrun + ["--master_port", str(_free_port()), "-m", "igscale.cli.train", "--config", str(cfg_path)],
             env, logs / "train.log")
        _run([py, "-m", "igscale.cli.main", "export", "--checkpoint", f"{root}/checkpoints", "--out",
              f"{root}/export"], env, logs / "export.log")

        # 5. sample with IG and CFG+IG on 2 processes -------------------------------------------------------------
        settings = {
            "ig": ["--w-ig", "1.4"],
            "cfg_ig": ["--w-ig", "1.4", "--w-cfg", "2.0", "--cfg-interval", "0", "0.81"],
        }
        samples = {}
        for name, extra in settings.items():
            out = work / f"samples_{name}"
            _run(torchrun + ["--master_port", str(_free_port()), "-m", "igscale.cli.main", "sample", "--export",
                             f"{root}/export", "--vae", "sd-vae", "--vae-weights", f"{root}/weights/vae",
                             "--method", "heun", "--num-steps", "12", "--num-samples", str(a.num_samples),
                             "--chunk-size", "16", "--batch-size", "16", "--out", str(out), *extra],
                 env, logs / f"sample_{name}.log")
            samples[name] = out / "samples.npz"

        # 6. metrics through the evaluation code path (random-weight Inception) ------------------------------------
        import torch

        from igscale.demo.weights import random_published_state
        from igscale.eval.inception import WEIGHTS_FILENAME

        inc = work / "inception_random"
        inc.mkdir()
        torch.save(random_published_state(0), inc / WEIGHTS_FILENAME)
        real = work / "real_images.npz"
        _real_images_npz(open_storage(f"{root}/images"), real, 64)
        ref = work / "reference_batch.npz"
        # random weights are not the published file, so their sha256 check is waived (and recorded as unverified)
        _run([py, "-m", "igscale.cli.main", "eval", "--make-ref", str(ref), "--images", str(real), "--inception",
              str(inc), "--allow-unverified-weights"], env, logs / "make_ref.log")
        metrics = {}
        for name, npz in samples.items():
            mpath = work / f"metrics_{name}.json"
            _run([py, "-m", "igscale.cli.main", "eval", str(ref), str(npz), "--inception", str(inc),
                  "--allow-unverified-weights", "--out", str(mpath)], env, logs / f"eval_{name}.log")
            metrics[name] = json.loads(mpath.read_text())

        # 7. grid + summary ---------------------------------------------------------------------------------------
        grid = work / "sample_grid.png"
        _grid([("IG 1.4", samples["ig"]), ("CFG2+IG1.4", samples["cfg_ig"])], real, grid, f"{root}/weights/vae")
        log = [json.loads(line) for line in (work / "train" / "train_log.jsonl").read_text().splitlines() if line]
        wall = time.time() - t_start
        print("\n" + "=" * 100)
        print(f"igscale demo finished in {wall:.0f} s. Everything is under {work}")
        print(f"  images (S3)        {root}/images                ({n} toy images, 4 classes)")
        print(f"  latents (S3)       {root}/latents/manifest.json  (Ray job; random-weight VAE)")
        print(f"  checkpoints (S3)   {root}/checkpoints            export: {root}/export")
        print(f"  TensorBoard        tensorboard --logdir {work / 'train' / 'tensorboard'} --host 127.0.0.1")
        if log:
            print(f"  training           loss {log[0]['train/loss']:.4f} -> {log[-1]['train/loss']:.4f}, "
                  f"aux loss {log[0]['train/loss_aux']:.4f} -> {log[-1]['train/loss_aux']:.4f} "
                  f"(steps {log[0].get('step')} -> {log[-1].get('step')})")
        print(f"  samples            {samples['ig']}  {samples['cfg_ig']}")
        print(f"  sample grid        {grid}")
        print(f"  logs               {logs}")
        print("  the VAE has random weights, so decoded pixels are noise (compare the real->VAE row of the grid);")
        print("  metrics (RANDOM-WEIGHT Inception: these exercise the evaluation code path, they are not FIDs):")
        keys = ["fid", "sfid", "inception_score", "precision", "recall"]
        print("    " + f"{'setting':<10}" + "".join(f"{k:>18}" for k in keys))
        for name, m in metrics.items():
            vals = m.get("metrics", m)
            print("    " + f"{name:<10}" + "".join(f"{vals.get(k, float('nan')):>18.4f}" for k in keys))
        print("  the S3 server is stopped now; its data stays in " + str(s3.data_dir))
        print("=" * 100)
        (work / "demo_summary.json").write_text(json.dumps({"wall_s": wall, "metrics": metrics,
                                                            "grid": str(grid)}, indent=2))
    finally:
        _say(f"stopping the S3 server (pid {s3.pid})")
        s3.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
