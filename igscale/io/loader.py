"""Streaming training loader over precomputed latent shards (WebDataset tars on S3 or local disk).

Determinism and exact resume (the contract the trainer relies on):
  * Epoch e's shard order is a permutation drawn from (seed, e). Rank r takes every world_size-th shard of it
    (split by node); within the rank, logical worker w takes every num_workers-th of those (split by worker).
  * Each logical worker streams its shards through a shuffle buffer seeded by (seed, e, rank, w) and cuts the
    stream into chunks of batch_size. Posterior noise / flip choice of a sample depends only on (seed, e, key).
    So every worker's chunk sequence is a pure function of (manifest, seed, e, rank, w).
  * The main process takes full chunks from the workers round-robin (torch's in-order DataLoader; a finished
    worker drops out of the rotation) and yields them as batches. Each worker's last, partial chunk is held
    back; at the end of the epoch the held tails are concatenated in worker order and re-cut into batches, so
    only the epoch's final batch can be short and no batch spans two epochs.
  * state_dict = {epoch, chunks received per worker, last worker served, tails held, tail batches yielded}.
    A fresh loader given that state has each worker regenerate its stream and skip (without decoding) the
    chunks already consumed, and starts the rotation at the worker after the last one served, so its batches
    equal the uninterrupted stream. Skipping re-reads the skipped bytes: resume costs up to one epoch of reads
    per rank, never decode work.
Ranks can differ in sample count by up to one shard per epoch (`batches_per_epoch(rank)` tells every rank all
counts up front). Corrupt or truncated shards raise ShardReadError naming the URL, or are skipped and counted.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

from igscale.io.shard_format import FIELDS, MANIFEST, decode_stack, iter_tar_samples
from igscale.io.storage import is_s3_url, open_storage
from igscale.seeding import GOLDEN, MIX1, MIX2, splitmix64
from igscale.vae import LatentNorm

__all__ = ["LatentLoader", "ShardReadError", "register_s3_gopen", "epoch_shard_order", "assign_shards",
           "load_manifest"]


class ShardReadError(RuntimeError):
    """A shard could not be read completely (corrupt, truncated, missing)."""


# ---------------------------------------------------------------------------------------------- S3 streaming
_S3_STORES: dict = {}


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, *, endpoint_url: str | None = None, **kw):
    if mode != "rb":
        raise ValueError(f"s3 gopen handler is read-only, got mode {mode!r}")
    bucket, _, key = url[len("s3://"):].partition("/")
    from igscale.io.storage import S3Storage

    # One client per (process, bucket, endpoint): creating a boto3 client costs far more than opening a shard.
    store = _S3_STORES.get((os.getpid(), bucket, endpoint_url))
    if store is None:
        store = _S3_STORES[(os.getpid(), bucket, endpoint_url)] = S3Storage(bucket, "", endpoint_url=endpoint_url)
    return store.open_read(key)


def register_s3_gopen(endpoint_url: str | None = None) -> None:
    """Let webdataset open s3:// URLs through a boto3 streaming GET (no CLI process per shard)."""
    import importlib

    # `webdataset.gopen` the attribute is the function; the module holds the scheme table.
    gopen_module = importlib.import_module("webdataset.gopen")
    gopen_module.gopen_schemes["s3"] = functools.partial(_gopen_s3, endpoint_url=endpoint_url)


# ---------------------------------------------------------------------------------------------- planning
def load_manifest(manifest_url: str, endpoint_url: str | None = None) -> tuple[dict, str]:
    """Returns (manifest, base URL that shard keys are relative to)."""
    url = manifest_url.rstrip("/")
    if not url.endswith(".json"):
        url = f"{url}/{MANIFEST}"
    base, _, name = url.rpartition("/")
    m = json.loads(open_storage(base or ".", endpoint_url=endpoint_url).get_text(name))
    return m, base


def epoch_shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n_shards).tolist()


def assign_shards(order: list[int], rank: int, world_size: int, num_workers: int) -> list[list[int]]:
    """Shards of `rank`, split over its logical workers: [worker][i] -> shard index."""
    mine = order[rank::world_size]
    return [mine[w::num_workers] for w in range(num_workers)]


# ---------------------------------------------------------------------------------------------- worker stream
def _mix(seed: int, epoch: int, key: int) -> int:
    """A 63-bit seed from (seed, epoch, key): splitmix64, so nearby inputs decorrelate."""
    return splitmix64(seed * GOLDEN + epoch * MIX1 + key * MIX2) >> 1


class _EpochStream(torch.utils.data.IterableDataset):
    def __init__(self, spec: dict, epoch: int, offset: int, skips: list[int]):
        super().__init__()
        self.spec, self.epoch, self.offset, self.skips = spec, epoch, offset, skips

    def _samples(self, shards: list[int], corrupt: list[str]) -> Iterator[dict]:
        import importlib

        gopen = importlib.import_module("webdataset.gopen").gopen  # s3:// -> our boto3 stream handler
        sp = self.spec
        need = [f"{f}.npy" for f in sp["fields"]] + ["cls"]
        for k in shards:
            info = sp["shards"][k]
            url = f"{sp['base']}/{info['key']}"
            n = 0
            try:
                with gopen(url, "rb") as stream:
                    for s in iter_tar_samples(stream):
                        missing = [f for f in need if f not in s]
                        if missing:  # a tar cut mid-sample yields a sample without all of its members
                            raise ShardReadError(f"sample {s.get('__key__')!r} lacks {missing}")
                        n += 1
                        yield s
                if n != info["count"]:
                    raise ShardReadError(f"expected {info['count']} samples, read {n}")
            except Exception as e:  # noqa: BLE001 - any read/parse failure is reported with the shard URL
                if sp["on_corrupt"] == "raise":
                    raise ShardReadError(f"corrupt or truncated shard {url}: {type(e).__name__}: {e}") from None
                corrupt.append(url)

    def _shuffled(self, it: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        size = self.spec["shuffle_buffer"]
        buf: list[dict] = []
        for s in it:
            buf.append(s)
            if len(buf) >= size:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        while buf:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()

    def _decode(self, chunk: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sp = self.spec
        f0, f1 = sp["fields"]
        a = decode_stack([s[f"{f0}.npy"] for s in chunk], sp["dtype"])  # (B, C, h, w)
        b = decode_stack([s[f"{f1}.npy"] for s in chunk], sp["dtype"])
        keys = [int(s["__key__"]) for s in chunk]
        g = self._gen
        if sp["mode"] == "mean_std":  # SiT recipe: a fresh posterior sample every time the sample is read
            eps = torch.empty_like(a)
            for i, k in enumerate(keys):
                g.manual_seed(_mix(sp["seed"], self.epoch, k))
                torch.randn(a.shape[1:], generator=g, out=eps[i])
            z = eps.mul_(b).add_(a)  # in place: fresh multi-MB tensors cost page faults
        else:  # LightningDiT recipe: the stored sample or its mirror, with probability 1/2 each
            flips = []
            for k in keys:
                g.manual_seed(_mix(sp["seed"], self.epoch, k))
                flips.append(bool(torch.rand((), generator=g) < 0.5))
            z = torch.where(torch.tensor(flips).view(-1, 1, 1, 1), b, a)
        z = sp["norm"].normalize_(z)
        labels = torch.tensor([int(s["cls"]) for s in chunk], dtype=torch.int64)
        return z, labels, torch.tensor(keys, dtype=torch.int64)

    def __iter__(self):
        sp = self.spec
        register_s3_gopen(sp["endpoint_url"])
        self._gen = torch.Generator()  # re-seeded per sample: noise depends only on (seed, epoch, key)
        wi = torch.utils.data.get_worker_info()
        n_workers = sp["num_workers"]
        w = ((wi.id if wi else 0) + self.offset) % n_workers
        torch.set_num_threads(1) if wi else None
        shards = assign_shards(epoch_shard_order(len(sp["shards"]), sp["seed"], self.epoch),
                               sp["rank"], sp["world_size"], n_workers)[w]
        corrupt: list[str] = []
        rng = np.random.default_rng([sp["seed"], self.epoch, sp["rank"], w, 0x5B])
        chunk, c, bs = [], 0, sp["batch_size"]
        for s in self._shuffled(self._samples(shards, corrupt), rng):
            chunk.append(s)
            if len(chunk) == bs:
                if c >= self.skips[w]:
                    z, y, k = self._decode(chunk)
                    yield {"latent": z, "label": y, "key": k, "_worker": w, "_chunk": c, "_tail": False,
                           "_corrupt": list(corrupt)}
                chunk, c = [], c + 1
        if chunk and c >= self.skips[w]:
            z, y, k = self._decode(chunk)
            yield {"latent": z, "label": y, "key": k, "_worker": w, "_chunk": c, "_tail": True, "_corrupt": list(corrupt)}
        elif corrupt:  # nothing left to send but the main process must still learn about skipped shards
            yield {"latent": None, "label": None, "key": None, "_worker": w, "_chunk": c - 1, "_tail": None,
                   "_corrupt": list(corrupt)}


# ---------------------------------------------------------------------------------------------- loader
class LatentLoader:
    """Iterate it once per epoch: `for batch in loader:` yields {"latent": (B,C,h,w) float32 normalised,
    "label": (B,) int64} and ends exactly at the epoch boundary; `loader.epoch` then advances."""

    def __init__(self, manifest_url: str, *, batch_size: int, rank: int, world_size: int, num_workers: int = 2,
                 seed: int = 0, shuffle_buffer: int = 1000, endpoint_url: str | None = None,
                 on_corrupt: Literal["raise", "skip"] = "raise",
                 norm: Literal["auto", "scalar", "per_channel"] | LatentNorm = "auto", return_keys: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size <= 0 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError("batch_size must be > 0, num_workers >= 0, shuffle_buffer >= 1")
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        self.manifest, base = load_manifest(manifest_url, endpoint_url)
        m = self.manifest
        if not base and not is_s3_url(manifest_url):
            base = "."
        self.norm = norm if isinstance(norm, LatentNorm) else LatentNorm.from_manifest(m, norm)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.rank, self.world_size = rank, world_size
        self.num_samples: int = m["num_samples"]
        self.latent_shape: tuple[int, ...] = tuple(m["latent"]["shape"])
        self._spec = {
            "base": base, "shards": [{"key": s["key"], "count": s["count"]} for s in m["shards"]],
            "fields": FIELDS[m["mode"]], "mode": m["mode"], "dtype": m["latent"]["dtype"], "seed": seed,
            "shuffle_buffer": shuffle_buffer, "batch_size": batch_size, "num_workers": max(1, num_workers),
            "rank": rank, "world_size": world_size, "on_corrupt": on_corrupt, "endpoint_url": endpoint_url,
            "norm": self.norm,
        }
        self.return_keys = return_keys  # also yield "key": (B,) int64 source-image indices (tests, debugging)
        self.corrupt_shards: set[str] = set()
        self.epoch = 0
        self._reset_epoch_state()

    def _reset_epoch_state(self) -> None:
        n = self._spec["num_workers"]
        self._received = [0] * n
        self._last_worker: int | None = None
        self._tails_held: list[int] = []
        self._tail_batches = 0

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "received": list(self._received), "last_worker": self._last_worker,
                "tails_held": sorted(self._tails_held), "tail_batches": self._tail_batches,
                "num_workers": self._spec["num_workers"], "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self._spec["seed"]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k in ("num_workers", "rank", "world_size", "batch_size", "seed"):
            mine = self._spec["num_workers"] if k == "num_workers" else (
                self._spec["seed"] if k == "seed" else getattr(self, k))
            if d[k] != mine:
                raise ValueError(f"loader state has {k}={d[k]} but this loader has {mine}; exact resume needs "
                                 "the same rank layout, workers, batch size and seed")
        self.epoch = d["epoch"]
        self._received = list(d["received"])
        self._last_worker = d["last_worker"]
        self._tails_held = list(d["tails_held"])
        self._tail_batches = d["tail_batches"]

    # -- sizes
    def samples_per_rank(self, epoch: int | None = None) -> list[int]:
        e = self.epoch if epoch is None else epoch
        order = epoch_shard_order(len(self._spec["shards"]), self._spec["seed"], e)
        return [sum(self._spec["shards"][k]["count"] for k in order[r::self.world_size])
                for r in range(self.world_size)]

    def batches_per_epoch(self, rank: int | None = None, epoch: int | None = None) -> int:
        """Batches `rank` yields in `epoch` (assuming no corrupt shards)."""
        r = self.rank if rank is None else rank
        e = self.epoch if epoch is None else epoch
        order = epoch_shard_order(len(self._spec["shards"]), self._spec["seed"], e)
        per_w = [sum(self._spec["shards"][k]["count"] for k in ws)
                 for ws in assign_shards(order, r, self.world_size, self._spec["num_workers"])]
        bs = self.batch_size
        return sum(n // bs for n in per_w) + -(-sum(n % bs for n in per_w) // bs)

    # -- iteration
    def _items(self, skips: list[int], offset: int) -> Iterator[dict]:
        ds = _EpochStream(self._spec, self.epoch, offset, skips)
        if self.num_workers == 0:
            yield from ds
            return
        yield from torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                               prefetch_factor=4, in_order=True)

    def _out(self, z: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"latent": z, "label": y, "key": k} if self.return_keys else {"latent": z, "label": y}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = self._spec["num_workers"]
        skips = [self._received[w] - (1 if w in self._tails_held else 0) for w in range(n)]
        offset = 0 if self._last_worker is None else (self._last_worker + 1) % n
        tails: dict[int, dict] = {}
        for item in self._items(skips, offset):
            self.corrupt_shards.update(item["_corrupt"])
            w = item["_worker"]
            if item["_tail"] is None:
                continue
            if item["_tail"]:
                tails[w] = item
                if w not in self._tails_held:
                    self._received[w] = item["_chunk"] + 1
                    self._last_worker = w
                    self._tails_held.append(w)
                continue
            self._received[w] = item["_chunk"] + 1
            self._last_worker = w
            yield self._out(item["latent"], item["label"], item["key"])
        # Epoch end: held tails, concatenated in worker order, re-cut into batches.
        if tails:
            z = torch.cat([tails[w]["latent"] for w in sorted(tails)])
            y = torch.cat([tails[w]["label"] for w in sorted(tails)])
            k = torch.cat([tails[w]["key"] for w in sorted(tails)])
            for i in range(self._tail_batches * self.batch_size, len(y), self.batch_size):
                self._tail_batches += 1
                sl = slice(i, i + self.batch_size)
                yield self._out(z[sl], y[sl], k[sl])
        self.epoch += 1
        self._reset_epoch_state()
