"""Streaming training loader over precomputed latent shards (WebDataset tars on S3 or local disk).

Determinism and exact resume (the contract the trainer relies on):
  * Epoch e's shard order is a permutation drawn from (seed, e). Rank r takes every world_size-th shard of it
    (split by node); within the rank, logical worker w takes every num_workers-th of those (split by worker).
  * Each logical worker cuts its sample stream into windows of shuffle_buffer samples, emits each window in a
    random order seeded by (seed, e, rank, w), and cuts the result into chunks of batch_size. The flip choice of
    a sample depends on (seed, e, key); the posterior noise of a chunk on (seed, e, rank, w, chunk index). So
    every worker's chunk sequence is a pure function of (manifest, seed, e, rank, w).
  * Chunks are taken from the workers (threads, or torch DataLoader processes) round-robin in order, a finished
    worker dropping out of the rotation, and yielded as batches. Each worker's last, partial chunk is held
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

import atexit
import functools
import json
import os
import threading
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

from bench.legacy_loader.reader import SampleBlock, read_sample_blocks
from igscale.core.seeding import GOLDEN, MASK64, MIX1, MIX2, splitmix64, splitmix64_np
from igscale.latents.format import FIELDS, MANIFEST, torch_dtype
from igscale.latents.norm import LatentNorm
from igscale.storage import StorageError, is_s3_url, is_storage_failure, open_storage

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
    from igscale.storage import S3Storage

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
    """Output buffers that go back into use once the consumer has dropped every view of them: the storage's use
    count is back to what it was when the buffer was made (the pool's own references, plus any torch keeps, e.g.
    a view's base). A fresh multi-MB buffer per batch costs page faults, which on VMs cost more than filling it.
    Buffers are handed out only as views (`get(n)` = buf[:n]), so a consumer always holds a reference of its
    own. Off for process workers: pickling moves a storage to shared memory that the main process keeps
    reading. `allocated` counts buffers made (tests check that reuse happens)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, enabled: bool):
        self.shape, self.dtype = shape, dtype
        self.enabled = enabled and hasattr(torch._C, "_storage_Use_Count")
        self.bufs: list[tuple[torch.Tensor, Any, int]] = []  # (buffer, its storage, use count when idle)
        self.allocated = 0

    def get(self, n: int) -> torch.Tensor:
        if self.enabled:
            for t, st, idle in self.bufs:
                if torch._C._storage_Use_Count(st._cdata) == idle:
                    return t[:n]
        # numpy's allocator advises transparent huge pages for big arrays (torch's does not): one fault per 2 MiB.
        # Raw bytes viewed as the torch dtype, so bfloat16 (which numpy lacks) needs no special case.
        nbytes = int(np.prod(self.shape)) * torch.empty(0, dtype=self.dtype).element_size()
        t = torch.from_numpy(np.empty(nbytes, np.uint8)).view(self.dtype).view(self.shape)
        self.allocated += 1
        if self.enabled and len(self.bufs) < 64:
            st = t.untyped_storage()
            self.bufs.append((t, st, torch._C._storage_Use_Count(st._cdata)))
        return t[:n]


class _EpochStream(torch.utils.data.IterableDataset):
    """One logical worker's epoch: its shards -> shuffle windows -> chunks of batch_size (see the module doc).

    Shuffle: the sample stream is cut into windows of `shuffle_buffer` samples and each window is emitted in a
    uniformly random order (the last window may be short). Samples are written straight to their output row
    in a staging array as they are parsed, so a sample is copied once between the read buffer and its batch."""

    def __init__(self, spec: dict, epoch: int, offset: int, skips: list[int], pools: dict | None = None):
        super().__init__()
        self.spec, self.epoch, self.offset, self.skips = spec, epoch, offset, skips
        self.pools = pools  # buffer pools kept by the loader across epochs (thread workers), else per stream

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
            except Exception as e:  # noqa: BLE001 - classified: storage outage, or a shard that is really bad
                if is_storage_failure(e):  # never skipped, never called corrupt: the data may be fine
                    raise StorageError(f"storage error reading shard {url} (endpoint "
                                       f"{sp['endpoint_url'] or 'from the environment'}): {type(e).__name__}: "
                                       f"{e}") from e
                if sp["on_corrupt"] == "raise":
                    raise ShardReadError(f"corrupt or truncated shard {url}: {type(e).__name__}: {e}") from None
                corrupt.append(url)

    def _flips(self, keys: np.ndarray) -> torch.Tensor | None:
        """sample_flip: take the mirrored sample, with probability 1/2 per (seed, epoch, key). None for mean_std."""
        sp = self.spec
        if sp["mode"] == "mean_std":
            return None
        return torch.from_numpy((_mix_many(sp["seed"], self.epoch, keys) >> np.uint64(40)) & np.uint64(1) == 1)

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
        n_workers = sp["num_workers"]
        w = (worker_id + self.offset) % n_workers
        shards = assign_shards(epoch_shard_order(len(sp["shards"]), sp["seed"], self.epoch),
                               sp["rank"], sp["world_size"], n_workers)[w]
        corrupt: list[str] = []
        rng = np.random.default_rng([sp["seed"], self.epoch, sp["rank"], w, 0x5B])
        bs, win, skip = sp["batch_size"], sp["shuffle_buffer"], self.skips[w]
        dtype = torch_dtype(sp["dtype"])
        on_device = sp["finish_on"] == "device"
        # A window's staging buffer: rows [0, carry) = the previous window's unfinished chunk, then the window's
        # samples at their shuffled positions, as (2, C, h, w) stored pairs. Chunks leave as views of it, so a
        # sample is copied once from the read buffer to its batch; the buffer is reused once they are dropped.
        pools = {} if self.pools is None else self.pools
        stages = pools.setdefault((w, "stage"), _Recycler((win + bs, 2, *sp["shape"]), dtype, sp["recycle"]))
        latent_bufs = pools.setdefault((w, "latent"), _Recycler((bs, *sp["shape"]), torch.float32, sp["recycle"]))

        def new_stage() -> tuple[torch.Tensor, np.ndarray]:
            t = stages.get(win + bs)
            return t, (t.view(torch.uint16) if sp["dtype"] == "bfloat16" else t).numpy()

        stage, stage_np = new_stage()
        keys = np.empty(win + bs, np.int64)
        labels = np.empty(win + bs, np.int64)
        base = 0  # stream position of stage row 0 (a chunk start)
        carry, j, perm = 0, 0, rng.permutation(win)
        sent = 0  # corrupt shards already reported with a chunk

        def close_window(last: bool) -> Iterator[dict]:
            nonlocal stage, stage_np, base, carry, j, perm, sent
            end = carry + j
            if j < win:  # a short last window: its rows sit at carry + perm[:j]; close the gaps, order kept
                used = carry + np.sort(perm[:j])
                stage_np[carry:end] = stage_np[used]
                keys[carry:end], labels[carry:end] = keys[used], labels[used]
            n_out = -(-end // bs) if last else end // bs
            for c in range(n_out):
                lo, hi = c * bs, min(end, (c + 1) * bs)
                idx = base // bs + c
                if idx < skip:  # delivered before a resume
                    continue
                item = {"label": labels[lo:hi].copy(), "key": keys[lo:hi].copy(), "_worker": w, "_chunk": idx,
                        "_tail": hi - lo < bs, "_corrupt": list(corrupt)}
                seed, flip = _chunk_seed(sp["seed"], self.epoch, sp["rank"], w, idx), self._flips(keys[lo:hi])
                if on_device:  # a view of the stage, finished by LatentLoader.to_device
                    item.update(stored=stage[lo:hi], noise_seed=seed, flip=flip)
                else:
                    item["latent"] = finish_stored(stage[lo:hi], seed, sp["norm"], flip, out=latent_bufs.get(hi - lo))
                sent = len(corrupt)
                yield item
            rest = 0 if last else end - n_out * bs
            old, old_np = stage, stage_np
            stage, stage_np = new_stage()
            if rest:
                stage_np[:rest] = old_np[n_out * bs:end]
                keys[:rest], labels[:rest] = keys[n_out * bs:end], labels[n_out * bs:end]
            del old, old_np
            base, carry, j, perm = base + n_out * bs, rest, 0, rng.permutation(win)

        for block in self._blocks(shards, corrupt):
            lo = 0
            while lo < len(block.keys):
                hi = min(len(block.keys), lo + win - j)
                pos = carry + perm[j:j + hi - lo]  # stage rows of these samples
                keys[pos], labels[pos] = block.keys[lo:hi], block.labels[lo:hi]
                # only rows of chunks not yet delivered (a resumed loader skips the rest without copying)
                keep = (base + pos) // bs >= skip
                whole = bool(keep.all())
                for f, arr in enumerate(block.arrays):
                    if whole:
                        stage_np[pos, f] = arr[lo:hi]
                    elif keep.any():
                        stage_np[pos[keep], f] = arr[lo:hi][keep]
                j += hi - lo
                lo = hi
                if j == win:
                    yield from close_window(last=False)
        yield from close_window(last=True)
        if len(corrupt) > sent:  # shards skipped after the last chunk sent: the main process must learn of them
            yield {"latent": None, "label": None, "key": None, "_worker": w, "_chunk": skip - 1, "_tail": None,
                   "_corrupt": list(corrupt)}


NoiseSeed = int | list[tuple[int, int, int, int]]


def finish_stored(stored: torch.Tensor, noise_seed: NoiseSeed, norm: LatentNorm, flip: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """A batch's stored pairs (B, 2, C, h, w) (any device) -> (B, C, h, w) float32 normalised model latents.

    flip None (SiT recipe, pairs = posterior mean and std): mean + std * eps, eps from a generator on stored's
    device seeded with noise_seed (the same numbers in the workers and in to_device on CPU; the device's own
    generator on CUDA). An epoch-end batch re-cut from several chunks' tails has one segment per chunk instead:
    noise_seed = [(chunk seed, chunk rows, first, stop), ...] -> rows [first, stop) of that chunk's noise.
    flip (B,) bool (LightningDiT recipe, pairs = sample and mirror): the mirror where set."""
    shape = stored.shape[:1] + stored.shape[2:]
    if out is None:
        out = torch.empty(shape, device=stored.device)
    if flip is not None:
        rows = torch.arange(len(flip), device=stored.device) * 2 + flip.to(stored.device, torch.int64)
        return norm.normalize_from(stored.flatten(0, 1).index_select(0, rows), out)
    g = torch.Generator(device=stored.device)
    if isinstance(noise_seed, int):
        g.manual_seed(noise_seed)
        torch.randn(shape, generator=g, device=stored.device, out=out)
    else:
        at = 0
        for seed, rows, first, stop in noise_seed:  # the whole chunk's draw, so rows equal the workers' numbers
            g.manual_seed(seed)
            out[at:at + stop - first] = torch.randn((rows, *shape[1:]), generator=g, device=stored.device)[first:stop]
            at += stop - first
        if at != len(out):
            raise ValueError(f"noise segments cover {at} rows of a batch of {len(out)}")
    return norm.normalize_(out.mul_(stored[:, 1]).add_(stored[:, 0]))


def _identity(x: Any) -> Any:
    return x


_END = object()
_RUNNING: set = set()  # (stop event, threads) of thread-worker epochs in progress


def _stop_running() -> None:
    """Stop worker threads left running by an abandoned epoch iterator."""
    for stop, threads in list(_RUNNING):
        stop.set()
        for t in threads:
            t.join(timeout=10)


# Worker threads are non-daemon, so none can still be inside a torch op when the interpreter finalises (a daemon
# thread re-taking the GIL then is unwound through a noexcept destructor: "terminate called without an active
# exception"). Interpreter exit first runs threading's exit hooks, then joins non-daemon threads: stop them there.
getattr(threading, "_register_atexit", atexit.register)(_stop_running)


def _threaded(streams: list[Iterator[dict]], prefetch: int) -> Iterator[dict]:
    """Run each worker stream in a thread and take their items round-robin, dropping finished workers: the
    order torch's in-order DataLoader gives process workers. The hot work (socket reads, numpy, torch)
    releases the GIL, and threads share one boto3 client and reuse their memory."""
    import queue

    stop = threading.Event()
    queues = [queue.Queue(maxsize=prefetch) for _ in streams]

    def put(q: queue.Queue, item: Any) -> bool:
        """Blocking put that gives up once the consumer has stopped (every put: a thread must never outlive it)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pump(it: Iterator[dict], q: queue.Queue) -> None:
        try:
            for item in it:
                if not put(q, item):
                    return
            put(q, _END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(q, e)

    threads = [threading.Thread(target=pump, args=(it, q), daemon=False, name=f"latent-loader-{i}")
               for i, (it, q) in enumerate(zip(streams, queues))]
    entry = (stop, tuple(threads))
    _RUNNING.add(entry)
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
        _RUNNING.discard(entry)


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
        self._pools: dict = {}  # output/staging buffers reused across epochs by thread workers
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
        ds = _EpochStream(self._spec, self.epoch, offset, skips,
                          pools=self._pools if self._spec["recycle"] else None)
        if self.num_workers == 0:
            yield from ds.stream(0)
        elif self.worker_type == "thread":
            yield from _threaded([ds.stream(i) for i in range(self.num_workers)], prefetch=4)
        else:
            yield from torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                   prefetch_factor=4, in_order=True, collate_fn=_identity)

    def _out(self, item: dict) -> dict[str, Any]:
        """A worker item as a batch: labels (and keys) as tensors, and either the finished latents or what
        to_device needs to finish them (stored pairs, noise seed, flip choices)."""
        out: dict[str, Any] = {"label": torch.from_numpy(item["label"])}
        out.update({k: item[k] for k in ("latent", "stored", "noise_seed", "flip") if k in item})
        if self.return_keys:
            out["key"] = torch.from_numpy(item["key"])
        return out

    def to_device(self, batch: dict[str, Any], device: torch.device | str,
                  non_blocking: bool = True) -> dict[str, torch.Tensor]:
        """A batch on `device` as {"latent": (B,C,h,w) float32, "label": (B,) int64 (, "key")}. With
        finish_on="device" this is where the batch is finished: the posterior sample drawn (from the batch's noise
        seed) and the latents normalised, on the device; otherwise it is a copy."""
        out = {"label": batch["label"].to(device, non_blocking=non_blocking)}
        if "stored" in batch:
            out["latent"] = finish_stored(batch["stored"].to(device, non_blocking=non_blocking),
                                          batch["noise_seed"], self.norm, batch["flip"])
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
            yield self._out(item)
        # Epoch end: held tails, concatenated in worker order, re-cut into batches. Unfinished tails stay
        # unfinished (to_device draws each row's noise from its own chunk's seed: noise segments).
        if tails:
            ts = [tails[w] for w in sorted(tails)]
            y = np.concatenate([t["label"] for t in ts])
            k = np.concatenate([t["key"] for t in ts])
            starts = np.cumsum([0] + [len(t["label"]) for t in ts])
            field = "stored" if "stored" in ts[0] else "latent"
            z = torch.cat([t[field] for t in ts])
            flips = None if field == "latent" or ts[0]["flip"] is None else torch.cat([t["flip"] for t in ts])
            for i in range(self._tail_batches * self.batch_size, len(y), self.batch_size):
                self._tail_batches += 1
                sl = slice(i, i + self.batch_size)
                item = {field: z[sl], "label": y[sl], "key": k[sl]}
                if field == "stored":
                    stop = min(i + self.batch_size, len(y))
                    item["noise_seed"] = [(t["noise_seed"], len(t["label"]), max(i, a) - a, min(stop, b) - a)
                                          for t, a, b in zip(ts, starts[:-1].tolist(), starts[1:].tolist())
                                          if a < stop and b > i]
                    item["flip"] = None if flips is None else flips[sl]
                yield self._out(item)
        self.epoch += 1
        self._reset_epoch_state()
