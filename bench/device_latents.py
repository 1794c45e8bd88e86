"""Write a random latent set (shards + manifest) with igscale's own shard writer, for device checks and benchmarks.

    python bench/device_latents.py --out /tmp/latents --num 2048 --shape 4,32,32 --mode mean_std

The layout is the precompute job's (igscale.latents.format): `mean_std` stores a posterior mean and std per sample
(SD-VAE / SiT recipe), `sample_flip` a latent and its mirror (VA-VAE / LightningDiT recipe). Values are random: the
set exercises the real loader and trainer at full size without a VAE or images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from igscale.latents.format import FIELDS, FORMAT, MANIFEST, encode_array, sample_key, shard_key, write_tar  # noqa: E402
from igscale.storage import open_storage  # noqa: E402


def write_random_latents(out: str, *, num: int, shape: tuple[int, ...], mode: str = "mean_std",
                         per_shard: int = 512, num_classes: int = 1000, dtype: str = "bfloat16",
                         seed: int = 0) -> str:
    """Write `num` samples to `out` (folder or s3:// prefix); returns the manifest's URL or path."""
    store = open_storage(out)
    g = torch.Generator().manual_seed(seed)
    a, b = FIELDS[mode]
    shards = []
    for k in range(-(-num // per_shard)):
        samples = []
        for i in range(k * per_shard, min((k + 1) * per_shard, num)):
            x = torch.randn(shape, generator=g)
            second = (0.1 + 0.05 * torch.rand(shape, generator=g)) if mode == "mean_std" else x.flip(-1)
            samples.append({"__key__": sample_key(i), f"{a}.npy": encode_array(x, dtype),
                            f"{b}.npy": encode_array(second, dtype), "cls": str(i % num_classes).encode()})
        store.put_bytes(shard_key(k), write_tar(samples))
        shards.append({"key": shard_key(k), "count": len(samples)})
    C = shape[0]
    manifest = {"format": FORMAT, "num_samples": num, "mode": mode, "fields": list(FIELDS[mode]),
                "latent": {"shape": list(shape), "dtype": dtype},
                "vae": {"kind": "sd-vae" if mode == "mean_std" else "va-vae"},
                "latent_stats": {"mean": [0.0] * C, "std": [1.0] * C}, "shards": shards,
                "source": {"num_classes": num_classes, "random": True}}
    store.put_text(MANIFEST, json.dumps(manifest, indent=1))
    return store.url(MANIFEST)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder or s3:// prefix")
    p.add_argument("--num", type=int, default=2048)
    p.add_argument("--shape", default="4,32,32", help="C,H,W of one latent (SD-VAE 256 px: 4,32,32)")
    p.add_argument("--mode", choices=sorted(FIELDS), default="mean_std")
    p.add_argument("--per-shard", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    a = p.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    url = write_random_latents(a.out, num=a.num, shape=shape, mode=a.mode, per_shard=a.per_shard,
                               num_classes=a.num_classes, dtype=a.dtype)
    print(f"wrote {a.num} random latents {shape} ({a.mode}) -> {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
