"""Precompute throughput: the job's worker path (JPEG read + ADM crop in threads, overlapped with a batched VAE
encode) with an SD-VAE-sized random-weight AutoencoderKL, batch 1 vs batched, measured in one run.

    python bench/bench_precompute.py [--images 24] [--batch 8] [--resolution 256] [--threads 2]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.encode import encode_shard, get_vae
from data_pipeline.plan import PrecomputeConfig


def make_images(root: Path, n: int) -> list[str]:
    """ImageNet-like JPEGs (~500x375, q90) in 2 class folders."""
    rng = np.random.default_rng(0)
    keys = []
    for i in range(n):
        h, w = (375, 500) if i % 2 else (500, 333)
        yy, xx = np.mgrid[0:h, 0:w]
        arr = (np.stack([xx, yy, xx + yy], -1) // 3 + rng.integers(0, 40, (h, w, 3))) % 256
        key = f"c{i % 2}/img{i:04d}.JPEG"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        (root / key).write_bytes(buf.getvalue())
        keys.append(key)
    return sorted(keys)


def run(cfg: PrecomputeConfig, keys: list[str]) -> float:
    t = time.perf_counter()
    res = encode_shard(cfg, 0, list(range(len(keys))), keys, [int(k[1]) for k in keys])
    dt = time.perf_counter() - t
    assert len(res.samples) == len(keys)
    return len(keys) / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        keys = make_images(Path(d), a.images)
        base = dict(input=d, output=str(Path(d) / "out"), vae_kind="sd-vae", resolution=a.resolution,
                    allow_random_vae=True, decode_threads=2)
        cfg1 = PrecomputeConfig.from_dict({**base, "batch_size": 1})
        cfgb = PrecomputeConfig.from_dict({**base, "batch_size": a.batch})
        vae = get_vae(cfg1, "cpu")  # load once, outside the timing
        n_params = sum(p.numel() for p in vae.parameters()) / 1e6
        run(cfg1, keys[:2])  # warm-up
        r1 = run(cfg1, keys)
        rb = run(cfgb, keys)
    print(f"SD-VAE-sized random AutoencoderKL ({n_params:.1f} M params), {a.images} JPEGs -> "
          f"{a.resolution}px ADM crop, mean+std, {a.threads} torch threads")
    print(f"| batch | img/s |\n|---|---|\n| 1 | {r1:.2f} |\n| {a.batch} | {rb:.2f} |")
    print(f"ratio batched / batch 1: {rb / r1:.2f}")


if __name__ == "__main__":
    main()
