"""Shared pieces of the launch tests (Slurm, Ray): a tiny labelled image tree, the training overrides, logs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")


def make_image_tree(root: Path, classes: int = 4, per_class: int = 4, size: int = 64) -> Path:
    """PNG images in one folder per class, class-dependent brightness (an ImageNet-style layout)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.clip(rng.normal(50 * c + 40, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i:03d}.png")
    return root


def precompute_args(images: str, output: str) -> list[str]:
    """data_pipeline.run flags for 64 px images -> 4x8x8 SD-VAE latents (random VAE weights: tests only)."""
    return ["--input", images, "--output", output, "--resolution", "64", "--allow-random-vae", "true",
            "--samples-per-shard", "4", "--batch-size", "8"]


def precompute_inline(images: Path, output: str, env: dict) -> str:
    """Runs the real pipeline without Ray; returns the manifest URL."""
    r = subprocess.run([sys.executable, "-m", "data_pipeline.run", "--executor", "inline",
                        *precompute_args(str(images), output)], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["manifest"]


def train_overrides(run_dir: Path, manifest: str, ckpt_url: str, steps: int) -> list[str]:
    return [f"run_dir={run_dir}", f"data.manifest_url={manifest}", f"checkpoint.url={ckpt_url}",
            f"train.total_steps={steps}", "logging.every_steps=1", "checkpoint.every_steps=50",
            "sample.every_steps=50"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from train_log.jsonl; a resumed run rewrites steps after its checkpoint, keep the last."""
    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]
    return out


def max_step(run_dir: Path) -> int:
    p = run_dir / "train_log.jsonl"
    if not p.exists():
        return -1
    steps = [json.loads(line)["step"] for line in p.read_text().splitlines() if line.strip()]
    return max(steps, default=-1)


def base_env(s3_env: dict, tmp: Path) -> dict:
    env = dict(os.environ, **s3_env, OMP_NUM_THREADS="1", TMPDIR=str(tmp), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(k, None)
    return env
