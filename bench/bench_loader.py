"""Loader throughput from a local SeaweedFS S3 server vs raw S3 GET of the same shards, in one run.

Writes synthetic latent shards (SD-VAE 256px layout: mean+std, 4x32x32 float32, ~33 KB/sample) + manifest,
then measures (a) raw GET MB/s: the same shards streamed with boto3 by `workers` parallel readers, (b) the
LatentLoader (webdataset + boto3 stream handler, shuffle buffer, posterior sampling, normalisation, batching)
with `workers` DataLoader workers. Alternates (a) and (b) `--repeats` times and reports medians.

    python bench/bench_loader.py [--shards 8] [--per-shard 500] [--workers 2] [--batch 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from igscale.io.loader import LatentLoader
from igscale.io.local_s3 import start_s3_server
from igscale.io.shard_format import FORMAT, encode_array, sample_key, shard_key, write_tar
from igscale.io.storage import S3Storage


def write_dataset(store: S3Storage, shards: int, per_shard: int) -> int:
    g = torch.Generator().manual_seed(0)
    total = 0
    recs = []
    for k in range(shards):
        samples = []
        for i in range(per_shard):
            idx = k * per_shard + i
            mean = torch.randn(4, 32, 32, generator=g)
            std = torch.rand(4, 32, 32, generator=g) * 0.1
            samples.append({"__key__": sample_key(idx), "cls": str(idx % 1000).encode(),
                            "mean.npy": encode_array(mean, "float32"), "std.npy": encode_array(std, "float32")})
        data = write_tar(samples)
        store.put_bytes(shard_key(k), data)
        total += len(data)
        recs.append({"key": shard_key(k), "url": store.url(shard_key(k)), "count": per_shard,
                     "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "first_index": k * per_shard,
                     "last_index": (k + 1) * per_shard - 1})
    manifest = {"format": FORMAT, "num_samples": shards * per_shard, "mode": "mean_std", "fields": ["mean", "std"],
                "latent": {"shape": [4, 32, 32], "dtype": "float32"},
                "vae": {"kind": "sd-vae", "scaling_factor": 0.18215},
                "latent_stats": {"mean": [0.0] * 4, "std": [1.0] * 4}, "shards": recs}
    store.put_text("manifest.json", json.dumps(manifest))
    return total


def raw_get(store: S3Storage, keys: list[str], workers: int) -> float:
    def read(k):
        n = 0
        body = store.client.get_object(Bucket=store.bucket, Key=f"{store.prefix}/{k}")["Body"]
        while chunk := body.read(1 << 20):
            n += len(chunk)
        return n

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        n = sum(pool.map(read, keys))
    return n / (time.perf_counter() - t)


def loader_epoch(url: str, endpoint: str, workers: int, batch: int, epoch: int) -> tuple[float, float, int, int]:
    """Returns (seconds for the whole epoch, seconds after the first batch, samples, samples after the first).
    The first batch waits for worker start-up and the shuffle-buffer fill, so the split is only a latency figure."""
    ld = LatentLoader(url, batch_size=batch, rank=0, world_size=1, num_workers=workers, shuffle_buffer=1000,
                      endpoint_url=endpoint)
    ld.load_state_dict({**ld.state_dict(), "epoch": epoch})
    t = time.perf_counter()
    it = iter(ld)
    n0 = len(next(it)["label"])
    t1 = time.perf_counter()
    n = n0 + sum(len(b["label"]) for b in it)
    t2 = time.perf_counter()
    return t2 - t, t2 - t1, n, n - n0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        server = start_s3_server(Path(d))
        try:
            import os

            os.environ.update(server.env)
            bucket = server.create_bucket("bench")
            store = S3Storage(bucket, "latents", endpoint_url=server.endpoint_url)
            total = write_dataset(store, a.shards, a.per_shard)
            keys = [shard_key(k) for k in range(a.shards)]
            raw_get(store, keys, a.workers)  # warm server caches for both sides alike
            raws, lds = [], []
            for r in range(a.repeats):
                raws.append(raw_get(store, keys, a.workers))
                dt, dt_steady, n, n_steady = loader_epoch(f"s3://{bucket}/latents/manifest.json",
                                                          server.endpoint_url, a.workers, a.batch, r)
                assert n == a.shards * a.per_shard
                lds.append((n / dt, total / dt, dt - dt_steady))
        finally:
            server.stop()
    raw = statistics.median(raws)
    sps, mbs, first = (statistics.median(x[i] for x in lds) for i in range(3))
    print(f"{a.shards} shards x {a.per_shard} samples (mean+std 4x32x32 fp32), {total / 1e6:.1f} MB, "
          f"{a.workers} workers, batch {a.batch}, median of {a.repeats}")
    print("| path | samples/s | MB/s |\n|---|---|---|")
    print(f"| raw boto3 GET ({a.workers} streams) | - | {raw / 1e6:.1f} |")
    print(f"| LatentLoader ({a.workers} workers), whole epoch | {sps:.0f} | {mbs / 1e6:.1f} |")
    print(f"ratio loader / raw GET: {mbs / raw:.2f}; time to first batch (worker start + shuffle-buffer fill): "
          f"{first:.2f} s")


if __name__ == "__main__":
    main()
