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

from igscale.io.shard_format import FIELDS, MANIFEST, torch_dtype
from igscale.io.shard_reader import SampleBlock, read_sample_blocks
from igscale.io.storage import is_s3_url, open_storage
from igscale.seeding import GOLDEN, MASK64, MIX1, MIX2, splitmix64, splitmix64_np
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


def _chunk_seed(seed: int, epoch: int, rank: int, worker: int, chunk: int) -> int:
    """Generator seed of one chunk's posterior noise: a pure function of the chunk's place in the stream."""
    return splitmix64(_mix(seed, epoch, rank) * GOLDEN + worker * MIX1 + chunk * MIX2) >> 1


def _mix_many(seed: int, epoch: int, keys: np.ndarray) -> np.ndarray:
    """_mix for an array of keys -> (n,) uint64 (equal to [_mix(seed, epoch, k) for k in keys])."""
    base = np.uint64((seed * GOLDEN + epoch * MIX1) & MASK64)
    with np.errstate(over="ignore"):
        return splitmix64_np(keys.astype(np.uint64) * np.uint64(MIX2) + base) >> np.uint64(1)


class _Recycler:
    """Output buffers that go back into use once the consumer has dropped every view of them (the storage's use
    count is back to the pool's own two references). A fresh multi-MB buffer per batch costs a page fault per
    4 KiB, which on VMs costs more than filling it. Buffers are handed out only as views (`get(n)` = buf[:n]),
    so a consumer always holds a reference of its own. Off for process workers: pickling moves a storage to
    shared memory that the main process keeps reading."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, enabled: bool):
        self.shape, self.dtype = shape, dtype
        self.enabled = enabled and hasattr(torch._C, "_storage_Use_Count")
        self.bufs: list[tuple[torch.Tensor, Any]] = []

    def get(self, n: int) -> torch.Tensor:
        if self.enabled:
            for t, st in self.bufs:
                if torch._C._storage_Use_Count(st._cdata) == 2:  # this tensor + this storage wrapper
                    return t[:n]
        t = torch.empty(self.shape, dtype=self.dtype)
        if self.enabled and len(self.bufs) < 64:
            self.bufs.append((t, t.untyped_storage()))
        return t[:n]


class _EpochStream(torch.utils.data.IterableDataset):
    """One logical worker's epoch: its shards -> shuffle windows -> chunks of batch_size (see the module doc).

    Shuffle: the sample stream is cut into windows of `shuffle_buffer` samples and each window is emitted in a
    uniformly random order (the last window may be short). Samples are written straight to their output row
    in a staging array as they are parsed, so a sample is copied once between the read buffer and its batch."""

    def __init__(self, spec: dict, epoch: int, offset: int, skips: list[int]):
        super().__init__()
        self.spec, self.epoch, self.offset, self.skips = spec, epoch, offset, skips

    def _blocks(self, shards: list[int], corrupt: list[str]) -> Iterator[SampleBlock]:
        import importlib

        gopen = importlib.import_module("webdataset.gopen").gopen  # s3:// -> our boto3 stream handler
        sp = self.spec
        for k in shards:
            info = sp["shards"][k]
            url = f"{sp['base']}/{info['key']}"
            n = 0
            try:
                with gopen(url, "rb") as stream:
                    for b in read_sample_blocks(stream, sp["fields"]):
                        if b.arrays[0].shape[1:] != sp["shape"] or b.arrays[0].dtype != sp["np_dtype"]:
                            raise ShardReadError(f"latents of shape {b.arrays[0].shape[1:]} {b.arrays[0].dtype}, "
                                                 f"manifest says {sp['shape']} {sp['np_dtype']}")
                        n += len(b.keys)
                        yield b
                if n != info["count"]:
                    raise ShardReadError(f"expected {info['count']} samples, read {n}")
            except Exception as e:  # noqa: BLE001 - any read/parse failure is reported with the shard URL
                if sp["on_corrupt"] == "raise":
                    raise ShardReadError(f"corrupt or truncated shard {url}: {type(e).__name__}: {e}") from None
                corrupt.append(url)

    def _stored(self, raw: torch.Tensor, keys: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """raw: (B, 2, C, h, w) stored pairs -> what a batch carries before finishing: the pair itself for
        mean_std; for sample_flip the stored sample or its mirror, with probability 1/2 each per (epoch, key),
        gathered into out ((B, C, h, w), stored dtype)."""
        sp = self.spec
        if sp["mode"] == "mean_std":
            return raw
        flip = (_mix_many(sp["seed"], self.epoch, keys) >> np.uint64(40)) & np.uint64(1)
        rows = torch.from_numpy((np.arange(len(keys)) * 2 + flip).astype(np.int64))
        return torch.index_select(raw.flatten(0, 1), 0, rows, out=out)

    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        if wi is not None:
            torch.set_num_threads(1)
        return self.stream(wi.id if wi else 0)

    def stream(self, worker_id: int) -> Iterator[dict]:
        """Chunks of physical worker `worker_id` (logical worker (worker_id + offset) mod num_workers)."""
        import warnings

        sp = self.spec
        register_s3_gopen(sp["endpoint_url"])
        # Shard bytes are read-only; the tensors made from them are only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self._gen = torch.Generator()
        n_workers = sp["num_workers"]
        w = (worker_id + self.offset) % n_workers
        shards = assign_shards(epoch_shard_order(len(sp["shards"]), sp["seed"], self.epoch),
                               sp["rank"], sp["world_size"], n_workers)[w]
        corrupt: list[str] = []
        rng = np.random.default_rng([sp["seed"], self.epoch, sp["rank"], w, 0x5B])
        bs, win, skip = sp["batch_size"], sp["shuffle_buffer"], self.skips[w]
        dtype = torch_dtype(sp["dtype"])
        on_device = sp["finish_on"] == "device"
        chosen_bufs = _Recycler((bs, *sp["shape"]), dtype, sp["recycle"])
        moment_bufs = _Recycler((bs, 2, *sp["shape"]), dtype, sp["recycle"])
        latent_bufs = _Recycler((bs, *sp["shape"]), torch.float32, sp["recycle"])
        # Open chunks: chunk c holds stream positions [c*bs, (c+1)*bs) as (bs, 2, C, h, w) stored pairs, written
        # in place as samples arrive (its numpy view in the stored dtype), plus their keys and labels.
        chunks: dict[int, tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]] = {}
        start, j, perm = 0, 0, rng.permutation(win)  # this window covers positions [start, start + win)
        sent = 0  # corrupt shards already reported with a chunk

        def chunk(c: int):
            if c not in chunks:
                t = moment_bufs.get(bs)
                a = (t.view(torch.uint16) if sp["dtype"] == "bfloat16" else t).numpy()
                chunks[c] = (t, a, np.empty(bs, np.int64), np.empty(bs, np.int64))
            return chunks[c]

        def place(pos: np.ndarray, keys: np.ndarray, labels: np.ndarray, arrays: list[np.ndarray]) -> None:
            c_of, r_of = np.divmod(pos, bs)
            for c in np.unique(c_of).tolist():
                if c < skip:  # delivered before a resume: not even copied
                    continue
                sel = np.flatnonzero(c_of == c)
                whole = len(sel) == len(pos)
                r = r_of if whole else r_of[sel]
                _, a, k, lab = chunk(c)
                k[r], lab[r] = (keys, labels) if whole else (keys[sel], labels[sel])
                for f, arr in enumerate(arrays):
                    a[r, f] = arr if whole else arr[sel]

        def emit(end: int, last: bool) -> Iterator[dict]:
            """Yield the chunks that are complete once positions below `end` are final."""
            nonlocal sent
            for c in sorted(chunks):
                n = min(bs, end - c * bs)
                if n < bs and not last:
                    break
                t, _, k, lab = chunks.pop(c)
                item = {"label": lab[:n].copy(), "key": k[:n].copy(), "_worker": w, "_chunk": c, "_tail": n < bs,
                        "_corrupt": list(corrupt)}
                seed = _chunk_seed(sp["seed"], self.epoch, sp["rank"], w, c)
                stored = self._stored(t[:n], k[:n], chosen_bufs.get(n))
                if on_device:  # finished by LatentLoader.to_device
                    item.update(stored=stored, noise_seed=seed)
                else:
                    item["latent"] = finish_stored(stored, seed, sp["norm"], out=latent_bufs.get(n))
                del t
                sent = len(corrupt)
                yield item

        for block in self._blocks(shards, corrupt):
            lo = 0
            while lo < len(block.keys):
                hi = min(len(block.keys), lo + win - j)
                place(start + perm[j:j + hi - lo], block.keys[lo:hi], block.labels[lo:hi],
                      [x[lo:hi] for x in block.arrays])
                j += hi - lo
                lo = hi
                if j == win:
                    yield from emit(start + win, last=False)
                    start, j, perm = start + win, 0, rng.permutation(win)
        if j:  # a short last window: its samples sit at start + perm[:j]; close the gaps, order kept
            old = start + np.sort(perm[:j])
            moved = [(p, q) for p, q in zip(old.tolist(), range(start, start + j)) if p != q]
            if moved:
                src, dst = np.array([p for p, _ in moved]), np.array([q for _, q in moved])
                rows = []
                for p in src.tolist():  # read every moved row before writing any (targets may be sources)
                    c, r = divmod(p, bs)
                    if c >= skip:
                        _, a, k, lab = chunks[c]
                        rows.append((a[r].copy(), k[r], lab[r]))
                    else:
                        rows.append(None)
                for q, row in zip(dst.tolist(), rows):
                    c, r = divmod(q, bs)
                    if row is not None and c >= skip:
                        _, a, k, lab = chunk(c)
                        a[r], k[r], lab[r] = row
            for c in [c for c in chunks if c * bs >= start + j]:  # chunks now past the stream's end
                del chunks[c]
        yield from emit(start + j, last=True)
        if len(corrupt) > sent:  # shards skipped after the last chunk sent: the main process must learn of them
            yield {"latent": None, "label": None, "key": None, "_worker": w, "_chunk": skip - 1, "_tail": None,
                   "_corrupt": list(corrupt)}


def finish_stored(stored: torch.Tensor, noise_seed: int, norm: LatentNorm,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """A batch's stored latents (any device) -> (B, C, h, w) float32 normalised model latents.

    stored (B, 2, C, h, w) = posterior mean and std (SiT recipe): mean + std * eps, eps from a generator on
    stored's device seeded with noise_seed (the same numbers in the workers and in to_device on CPU; the
    device's own generator on CUDA). stored (B, C, h, w): an already chosen sample (LightningDiT recipe)."""
    shape = stored.shape[:1] + stored.shape[2:] if stored.dim() == 5 else stored.shape
    if out is None:
        out = torch.empty(shape, device=stored.device)
    if stored.dim() != 5:
        return norm.normalize_from(stored, out)
    g = torch.Generator(device=stored.device)
    g.manual_seed(noise_seed)
    torch.randn(shape, generator=g, device=stored.device, out=out)
    return norm.normalize_(out.mul_(stored[:, 1]).add_(stored[:, 0]))


def _identity(x: Any) -> Any:
    return x


_END = object()


def _threaded(streams: list[Iterator[dict]], prefetch: int) -> Iterator[dict]:
    """Run each worker stream in a thread and take their items round-robin, dropping finished workers: the
    order torch's in-order DataLoader gives process workers. The hot work (socket reads, numpy, torch)
    releases the GIL, and threads share one boto3 client and reuse their memory."""
    import queue
    import threading

    stop = threading.Event()
    queues = [queue.Queue(maxsize=prefetch) for _ in streams]

    def pump(it: Iterator[dict], q: queue.Queue) -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    threads = [threading.Thread(target=pump, args=(it, q), daemon=True, name=f"latent-loader-{i}")
               for i, (it, q) in enumerate(zip(streams, queues))]
    for t in threads:
        t.start()
    try:
        active = list(range(len(streams)))
        while active:
            for i in list(active):
                item = queues[i].get()
                if item is _END:
                    active.remove(i)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)


# ---------------------------------------------------------------------------------------------- loader
class LatentLoader:
    """Iterate it once per epoch: `for batch in loader:` yields {"latent": (B,C,h,w) float32 normalised,
    "label": (B,) int64} and ends exactly at the epoch boundary; `loader.epoch` then advances."""

    def __init__(self, manifest_url: str, *, batch_size: int, rank: int, world_size: int, num_workers: int = 2,
                 seed: int = 0, shuffle_buffer: int = 1000, endpoint_url: str | None = None,
                 on_corrupt: Literal["raise", "skip"] = "raise",
                 norm: Literal["auto", "scalar", "per_channel"] | LatentNorm = "auto", return_keys: bool = False,
                 worker_type: Literal["thread", "process"] = "thread",
                 finish_on: Literal["workers", "device"] = "workers"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size <= 0 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError("batch_size must be > 0, num_workers >= 0, shuffle_buffer >= 1")
        if worker_type not in ("thread", "process"):
            raise ValueError(f"worker_type must be 'thread' or 'process', got {worker_type!r}")
        self.worker_type = worker_type
        if finish_on not in ("workers", "device"):
            raise ValueError(f"finish_on must be 'workers' or 'device', got {finish_on!r}")
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
            "norm": self.norm, "shape": tuple(m["latent"]["shape"]), "finish_on": finish_on,
            "recycle": worker_type == "thread" or num_workers == 0,
            "np_dtype": np.dtype(np.uint16 if m["latent"]["dtype"] == "bfloat16" else m["latent"]["dtype"]),
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
            yield from ds.stream(0)
        elif self.worker_type == "thread":
            yield from _threaded([ds.stream(i) for i in range(self.num_workers)], prefetch=4)
        else:
            yield from torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                   prefetch_factor=4, in_order=True, collate_fn=_identity)

    def _out(self, z: torch.Tensor | None, y: np.ndarray, k: np.ndarray, stored: torch.Tensor | None = None,
             noise_seed: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"label": torch.from_numpy(y)}
        if stored is None:
            out["latent"] = z
        else:
            out.update(stored=stored, noise_seed=noise_seed)
        if self.return_keys:
            out["key"] = torch.from_numpy(k)
        return out

    def to_device(self, batch: dict[str, Any], device: torch.device | str,
                  non_blocking: bool = True) -> dict[str, torch.Tensor]:
        """A batch on `device` as {"latent": (B,C,h,w) float32, "label": (B,) int64 (, "key")}. With
        finish_on="device" this is where the batch is finished: the posterior sample drawn (from the batch's noise
        seed) and the latents normalised, on the device; otherwise it is a copy."""
        out = {"label": batch["label"].to(device, non_blocking=non_blocking)}
        if "stored" in batch:
            out["latent"] = finish_stored(batch["stored"].to(device, non_blocking=non_blocking),
                                          batch["noise_seed"], self.norm)
        else:
            out["latent"] = batch["latent"].to(device, torch.float32, non_blocking=non_blocking)
        if "key" in batch:
            out["key"] = batch["key"]
        return out

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
            if "stored" in item:
                yield self._out(None, item["label"], item["key"], item["stored"], item["noise_seed"])
            else:
                yield self._out(item["latent"], item["label"], item["key"])
        # Epoch end: held tails, concatenated in worker order, re-cut into batches (sampled here: the rows of a
        # re-cut batch come from chunks with different noise seeds).
        for t in tails.values():
            if "stored" in t:
                t["latent"] = finish_stored(t.pop("stored"), t["noise_seed"], self.norm)
        if tails:
            z = torch.cat([tails[w]["latent"] for w in sorted(tails)])
            y = np.concatenate([tails[w]["label"] for w in sorted(tails)])
            k = np.concatenate([tails[w]["key"] for w in sorted(tails)])
            for i in range(self._tail_batches * self.batch_size, len(y), self.batch_size):
                self._tail_batches += 1
                sl = slice(i, i + self.batch_size)
                yield self._out(z[sl], y[sl], k[sl])
        self.epoch += 1
        self._reset_epoch_state()
