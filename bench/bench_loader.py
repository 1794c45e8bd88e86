"""Loader throughput from a local SeaweedFS S3 server vs raw S3 GET of the same shards, before and after the rewrite
of issue #15 item 5, side by side in one run.

Writes synthetic latent shards in the two stored layouts, each with a manifest:
  * SiT recipe: posterior mean+std, 4x32x32 float32 (SD-VAE 256px), ~33 KB/sample;
  * LightningDiT recipe: sample + mirrored sample, 32x16x16 bfloat16 (VA-VAE f16d32 256px), ~33 KB/sample.
For each configuration, `--repeats` times: raw GET MB/s (the same shards streamed by `workers` boto3 readers,
nothing else), then one epoch of the legacy loader (bench/legacy_loader: the loader before the rewrite) and one of
igscale.latents.loader.LatentLoader, in alternating order (`workers` workers, batch `--batch`, shuffle window 1000):
  * finish_on="device" (the trainer's default on CUDA): the workers read and parse, the batches carry the stored
    latents (+ noise seeds / flip choices) and `LatentLoader.to_device` draws the posterior sample and normalises
    on the training GPU, so that step is not loader work here;
  * finish_on="workers": the workers also draw the posterior (4096 Gaussians per sample on CPU) and normalise
    to float32, with thread and with process (torch DataLoader) workers.
Per layout it also times raw GET streams parsed by the standard library's tarfile ('r|', members read, nothing
else): the ceiling of a loader that reads with tarfile alone.
Each configuration keeps one loader of each kind across its epochs, as a trainer does. Reports medians over repeats
of samples/s for the whole epoch (incl. worker start and the first shuffle-window fill), and the ratio of MB/s to
raw GET measured in the same repeat, for the whole epoch and for the middle 80% of its samples (steady state).

Two CPU placements, one after the other in the same run (`--placement`):
  * shared: the S3 server and this process (raw GET or loader) share every CPU, so each CPU cycle the client
    spends is taken from the server: the ratio then measures the client's CPU cost next to the server's;
  * separate: the server pinned to CPU 0, this process (all its threads, worker processes too) to the other
    CPUs: the storage has its own CPU as in a cluster, and the ratio says whether the loader keeps up with it.

    python bench/bench_loader.py [--shards 16] [--per-shard 2000] [--workers 2] [--batch 256] [--repeats 3]
                                 [--placement shared,separate]

`--local-cpu` instead reads the same datasets from local files (page cache: no server, no network noise) on the
benchmark's last CPU and reports each loader's process CPU time per sample (user + system), median over repeats.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: bench.legacy_loader

from bench.legacy_loader.loader import LatentLoader as LegacyLoader  # noqa: E402
from igscale.demo.local_s3 import start_s3_server  # noqa: E402
from igscale.latents.format import FORMAT, encode_array, sample_key, shard_key, write_tar  # noqa: E402
from igscale.latents.loader import LatentLoader  # noqa: E402
from igscale.storage import LocalStorage, S3Storage  # noqa: E402

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


def raw_get(store: S3Storage, keys: list[str], workers: int, parse: bool = False) -> float:
    """MB/s of `workers` boto3 streams reading the shards; parse: through tarfile ('r|'), every member read."""
    def read(k):
        resp = store.client.get_object(Bucket=store.bucket, Key=f"{store.prefix}/{k}")
        body, n = resp["Body"], 0
        if parse:
            with tarfile.open(fileobj=body, mode="r|") as tar:
                for m in tar:
                    tar.extractfile(m).read()
            return resp["ContentLength"]
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


def loader_epoch(ld: LatentLoader | LegacyLoader) -> tuple[float, float, int, int]:
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


def local_cpu(a: argparse.Namespace) -> None:
    """Process CPU time per sample of each loader kind per configuration, reading local files."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    torch.set_num_threads(1)
    kinds = {"legacy": LegacyLoader, "new": LatentLoader}
    with tempfile.TemporaryDirectory() as d:
        for mode in LAYOUTS:
            write_dataset(LocalStorage(f"{d}/{mode}"), a.shards, a.per_shard, mode)
        print(f"{a.shards} shards x {a.per_shard} samples per layout from local files, {a.workers} workers, batch "
              f"{a.batch}, 1 CPU; CPU us per sample, median of {a.repeats} epochs (after one warm-up epoch)")
        print("| configuration | legacy | new |")
        print("|---|---|---|")
        for name, (mode, kw) in CONFIGS.items():
            cpu = {}
            for kind, cls in kinds.items():
                ld = cls(f"{d}/{mode}/manifest.json", batch_size=a.batch, rank=0, world_size=1,
                         num_workers=a.workers, shuffle_buffer=1000, **kw)
                xs = []
                for _ in range(a.repeats + 1):
                    r0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                    n = loader_epoch(ld)[2]
                    r1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                    xs.append(sum(b.ru_utime - a_.ru_utime + b.ru_stime - a_.ru_stime for a_, b in zip(r0, r1)) / n)
                cpu[kind] = statistics.median(xs[1:]) * 1e6
            print(f"| {name} | {cpu['legacy']:.1f} | {cpu['new']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--placement", default="shared,separate", help="comma list of shared, separate")
    p.add_argument("--local-cpu", action="store_true", help="CPU time per sample from local files instead")
    a = p.parse_args()
    if a.local_cpu:
        return local_cpu(a)
    placements = a.placement.split(",")
    cpus = sorted(os.sched_getaffinity(0))
    if not set(placements) <= {"shared", "separate"}:
        p.error(f"--placement takes shared and/or separate, got {a.placement!r}")
    if "separate" in placements and len(cpus) < 2:
        p.error("--placement separate needs at least 2 CPUs")
    kinds = {"legacy": LegacyLoader, "new": LatentLoader}
    res = {(pl, name, kind): [] for pl in placements for name in CONFIGS for kind in kinds}
    raws = {(pl, name): [] for pl in placements for name in [*CONFIGS, *LAYOUTS]}
    tars = {(pl, mode): [] for pl in placements for mode in LAYOUTS}
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
            loaders = {(name, kind): cls(f"s3://{bucket}/{mode}/manifest.json", batch_size=a.batch, rank=0,
                                         world_size=1, num_workers=a.workers, shuffle_buffer=1000,
                                         endpoint_url=server.endpoint_url, **kw)
                       for name, (mode, kw) in CONFIGS.items() for kind, cls in kinds.items()}
            # Configuration by configuration (raw GET re-measured before every epoch): a process-worker epoch forks,
            # and after a fork every page the parent writes takes a copy-on-write fault once, which would land on
            # the next configuration's buffers.
            for pl in placements:
                pin(server.pid, set(cpus[:1]) if pl == "separate" else set(cpus))
                pin(os.getpid(), set(cpus[1:]) if pl == "separate" else set(cpus))
                torch.set_num_threads(len(os.sched_getaffinity(0)))  # intra-op threads = this process's CPUs
                for mode in LAYOUTS:
                    for _ in range(a.repeats):
                        raws[pl, mode].append(raw_get(stores[mode], keys, a.workers))
                        tars[pl, mode].append(raw_get(stores[mode], keys, a.workers, parse=True))
                for name, (mode, _kw) in CONFIGS.items():
                    for r in range(a.repeats):
                        raw = raw_get(stores[mode], keys, a.workers)
                        raws[pl, name].append(raw)
                        for kind in list(kinds)[::1 if r % 2 else -1]:  # alternate which loader follows raw GET
                            dt, dt_steady, n, n_steady = loader_epoch(loaders[name, kind])
                            assert n == a.shards * a.per_shard
                            mbs, mbs_steady = totals[mode] / dt, totals[mode] * n_steady / n / dt_steady
                            res[pl, name, kind].append((n / dt, mbs / raw, mbs_steady / raw))
        finally:
            server.stop()
    med = statistics.median
    print(f"{a.shards} shards x {a.per_shard} samples per layout ({totals['mean_std'] / 1e6:.0f} MB and "
          f"{totals['sample_flip'] / 1e6:.0f} MB), {a.workers} workers, batch {a.batch}, shuffle window 1000, "
          f"median of {a.repeats}; {len(cpus)} CPUs")
    print("| CPUs | shards | raw GET MB/s | raw GET parsed by tarfile, MB/s | ratio |")
    print("|---|---|---|---|---|")
    for pl in placements:
        for mode in LAYOUTS:
            ratio = med(t / r for t, r in zip(tars[pl, mode], raws[pl, mode]))
            print(f"| {pl} | {mode} | {med(raws[pl, mode]) / 1e6:.0f} | {med(tars[pl, mode]) / 1e6:.0f} | {ratio:.2f} |")
    print()
    print("| CPUs | configuration | raw GET MB/s | legacy samples/s | legacy ratio | legacy ratio, middle 80% | "
          "new samples/s | new ratio | new ratio, middle 80% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pl in placements:
        for name in CONFIGS:
            cols = [f"{med(x[0] for x in xs):.0f} | {med(x[1] for x in xs):.2f} | {med(x[2] for x in xs):.2f}"
                    for xs in (res[pl, name, "legacy"], res[pl, name, "new"])]
            print(f"| {pl} | {name} | {med(raws[pl, name]) / 1e6:.0f} | {cols[0]} | {cols[1]} |")


if __name__ == "__main__":
    main()
