"""Loader throughput from a local SeaweedFS S3 server vs raw S3 GET of the same shards, in one run.

Writes synthetic latent shards in the two stored layouts, each with a manifest:
  * SiT recipe: posterior mean+std, 4x32x32 float32 (SD-VAE 256px), ~33 KB/sample;
  * LightningDiT recipe: sample + mirrored sample, 32x16x16 bfloat16 (VA-VAE f16d32 256px), ~33 KB/sample.
For each configuration, `--repeats` times: raw GET MB/s (the same shards streamed by `workers` boto3 readers,
nothing else), then one LatentLoader epoch (`workers` workers, batch `--batch`, shuffle window 1000):
  * finish_on="device" (the trainer's default on CUDA): the workers read, parse, shuffle, batch and (sample_flip)
    choose sample or mirror; the batch carries the stored latents (+ a noise seed) and `LatentLoader.to_device`
    draws the posterior sample and normalises on the training GPU, so that step is not loader work here;
  * finish_on="workers": the workers also draw the posterior (4096 Gaussians per sample on CPU) and normalise
    to float32, with thread and with process (torch DataLoader) workers.
Each configuration keeps one loader across its epochs, as a trainer does. Reports medians over repeats of
samples/s and MB/s for the whole epoch (incl. worker start and the first shuffle-window fill) and for the middle
80% of its samples (steady state), and the ratio to raw GET measured in the same repeat.

Two CPU placements, one after the other in the same run (`--placement`):
  * shared: the S3 server and this process (raw GET or loader) share every CPU, so each CPU cycle the client
    spends is taken from the server: the ratio then measures the client's CPU cost next to the server's;
  * separate: the server pinned to CPU 0, this process (all its threads, worker processes too) to the other
    CPUs: the storage has its own CPU as in a cluster, and the ratio says whether the loader keeps up with it.

    python bench/bench_loader.py [--shards 16] [--per-shard 2000] [--workers 2] [--batch 256] [--repeats 3]
                                 [--placement shared,separate]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from igscale.demo.local_s3 import start_s3_server
from igscale.latents.format import FORMAT, encode_array, sample_key, shard_key, write_tar
from igscale.latents.loader import LatentLoader
from igscale.storage import S3Storage

LAYOUTS = {  # mode -> (fields, shape, stored dtype, vae kind)
    "mean_std": (("mean", "std"), (4, 32, 32), "float32", "sd-vae"),
    "sample_flip": (("latent", "flip"), (32, 16, 16), "bfloat16", "va-vae"),
}


def write_dataset(store: S3Storage, shards: int, per_shard: int, mode: str = "mean_std") -> int:
    fields, shape, dtype, vae = LAYOUTS[mode]
    g = torch.Generator().manual_seed(0)
    total = 0
    recs = []
    for k in range(shards):
        samples = []
        for i in range(per_shard):
            idx = k * per_shard + i
            a, b = torch.randn(shape, generator=g), torch.rand(shape, generator=g) * 0.1
            samples.append({"__key__": sample_key(idx), "cls": str(idx % 1000).encode(),
                            f"{fields[0]}.npy": encode_array(a, dtype), f"{fields[1]}.npy": encode_array(b, dtype)})
        data = write_tar(samples)
        store.put_bytes(shard_key(k), data)
        total += len(data)
        recs.append({"key": shard_key(k), "url": store.url(shard_key(k)), "count": per_shard,
                     "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "first_index": k * per_shard,
                     "last_index": (k + 1) * per_shard - 1})
    manifest = {"format": FORMAT, "num_samples": shards * per_shard, "mode": mode, "fields": list(fields),
                "latent": {"shape": list(shape), "dtype": dtype},
                "vae": {"kind": vae, "scaling_factor": 0.18215},
                "latent_stats": {"mean": [0.0] * shape[0], "std": [1.0] * shape[0]}, "shards": recs}
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


def pin(pid: int, cpus: set[int]) -> None:
    """CPU affinity of every thread of process `pid` (threads and processes started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def loader_epoch(ld: LatentLoader) -> tuple[float, float, int, int]:
    """One epoch of a loader kept across repeats, as a trainer keeps it. Returns (seconds for the whole epoch,
    seconds for the middle 80% of its samples, samples, samples in that middle part). The middle part leaves
    out worker start and the first shuffle-window fill (and the samples read ahead during it) and the drain."""
    total = ld.samples_per_rank()[ld.rank]
    t = time.perf_counter()
    n, marks = 0, {}
    for b in ld:
        n += len(b["label"])
        for f in (0.1, 0.9):
            if f not in marks and n >= f * total:
                marks[f] = (time.perf_counter(), n)
    t_end = time.perf_counter()
    (t1, n1), (t2, n2) = marks[0.1], marks[0.9]
    return t_end - t, t2 - t1, n, n2 - n1


CONFIGS = {  # name -> (dataset mode, LatentLoader keywords)
    "mean_std, finish on device": ("mean_std", {"finish_on": "device"}),
    "sample_flip, finish on device": ("sample_flip", {"finish_on": "device"}),
    "mean_std, finish in workers": ("mean_std", {"finish_on": "workers"}),
    "sample_flip, finish in workers": ("sample_flip", {"finish_on": "workers"}),
    "mean_std, finish in workers, process workers": ("mean_std", {"worker_type": "process"}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--placement", default="shared,separate", help="comma list of shared, separate")
    a = p.parse_args()
    placements = a.placement.split(",")
    cpus = sorted(os.sched_getaffinity(0))
    if not set(placements) <= {"shared", "separate"}:
        p.error(f"--placement takes shared and/or separate, got {a.placement!r}")
    if "separate" in placements and len(cpus) < 2:
        p.error("--placement separate needs at least 2 CPUs")
    res = {(pl, name): [] for pl in placements for name in CONFIGS}
    raws = {(pl, mode): [] for pl in placements for mode in LAYOUTS}
    with tempfile.TemporaryDirectory() as d:
        server = start_s3_server(Path(d))
        try:
            os.environ.update(server.env)
            bucket = server.create_bucket("bench")
            stores = {mode: S3Storage(bucket, mode, endpoint_url=server.endpoint_url) for mode in LAYOUTS}
            totals = {mode: write_dataset(stores[mode], a.shards, a.per_shard, mode) for mode in LAYOUTS}
            keys = [shard_key(k) for k in range(a.shards)]
            for mode in LAYOUTS:
                raw_get(stores[mode], keys, a.workers)  # warm server caches for both sides alike
            loaders = {name: LatentLoader(f"s3://{bucket}/{mode}/manifest.json", batch_size=a.batch, rank=0,
                                          world_size=1, num_workers=a.workers, shuffle_buffer=1000,
                                          endpoint_url=server.endpoint_url, **kw)
                       for name, (mode, kw) in CONFIGS.items()}
            # Configuration by configuration (raw GET re-measured before every epoch): a process-worker epoch forks,
            # and after a fork every page the parent writes takes a copy-on-write fault once, which would land on
            # the next configuration's buffers.
            for pl in placements:
                pin(server.pid, set(cpus[:1]) if pl == "separate" else set(cpus))
                pin(os.getpid(), set(cpus[1:]) if pl == "separate" else set(cpus))
                torch.set_num_threads(len(os.sched_getaffinity(0)))  # intra-op threads = this process's CPUs
                for name, (mode, _kw) in CONFIGS.items():
                    for _ in range(a.repeats):
                        raw = raw_get(stores[mode], keys, a.workers)
                        raws[pl, mode].append(raw)
                        dt, dt_steady, n, n_steady = loader_epoch(loaders[name])
                        assert n == a.shards * a.per_shard
                        mbs, mbs_steady = totals[mode] / dt, totals[mode] * n_steady / n / dt_steady
                        res[pl, name].append((n / dt, mbs, n_steady / dt_steady, mbs_steady, mbs / raw,
                                              mbs_steady / raw))
        finally:
            server.stop()
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    print(f"{a.shards} shards x {a.per_shard} samples per layout ({totals['mean_std'] / 1e6:.0f} MB and "
          f"{totals['sample_flip'] / 1e6:.0f} MB), {a.workers} workers, batch {a.batch}, shuffle window 1000, "
          f"median of {a.repeats}; {len(cpus)} CPUs")
    print("| CPUs | path | whole epoch samples/s | MB/s | ratio to raw GET | middle 80% samples/s | MB/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for pl in placements:
        for mode in LAYOUTS:
            print(f"| {pl} | raw boto3 GET, {mode} shards ({a.workers} streams) | - | "
                  f"{statistics.median(raws[pl, mode]) / 1e6:.0f} | 1 | - | - | - |")
        for name in CONFIGS:
            xs = res[pl, name]
            print(f"| {pl} | LatentLoader: {name} | {med(xs, 0):.0f} | {med(xs, 1) / 1e6:.0f} | {med(xs, 4):.2f} | "
                  f"{med(xs, 2):.0f} | {med(xs, 3) / 1e6:.0f} | {med(xs, 5):.2f} |")


if __name__ == "__main__":
    main()
