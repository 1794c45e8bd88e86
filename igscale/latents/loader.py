"""Streaming training loader over precomputed latent shards (tar shards + manifest, igscale.latents.format).

The stream of epoch e is a pure function of (manifest, seed, e, rank, world_size, num_workers, batch_size,
shuffle_buffer), the same for thread and process workers:
  * Shards: a permutation of the manifest's shards from Stream.SHARD_ORDER (e). Rank r takes order[r::world_size]
    (split by node); its logical worker w reads every num_workers-th of those, in order (split by worker).
  * Interleave: the workers' sample blocks (one per ~4 MiB read) are taken in turn, a finished worker dropping out
    (the order torch's in-order DataLoader gives process workers; the thread workers follow it too).
  * Shuffle: that stream is cut into windows of shuffle_buffer samples rounded up to a multiple of batch_size;
    each window is emitted in a uniformly random order (Stream.WINDOW_SHUFFLE (e, r, 0): one shuffle per rank,
    where the batches are cut; the workers only read) and cut into batches. Epoch tail: the last window holds what
    is left and is shuffled alike, so only the epoch's last batch can be short and no batch spans two epochs.
  * Read-time draws are per sample, from Stream.POSTERIOR (e, key): the posterior noise (mean_std: mean + std * eps)
    or the choice of the stored sample or its mirror (sample_flip: the seed's lowest bit). They do not depend on
    the batch, rank or worker, so finish_on="workers" (finished in the workers) and finish_on="device" (stored
    pairs, seeds and flips in the batch; `to_device` finishes them) give bitwise equal latents on the CPU.
state_dict() = {epoch, batches yielded this epoch}. A fresh loader given it reads the epoch again from its start,
copies nothing before the window of the next batch, and yields exactly the rest of the uninterrupted stream (resume
costs up to one epoch of reads per rank). Corrupt or truncated shards raise ShardReadError naming the URL, or with
on_corrupt="skip" are left out (samples read before the damage stay) and added to `corrupt_shards`, the same way on
a resume. A storage outage is a StorageError, never skipped.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch

from igscale.core.seeding import Stream, numpy_rng, seeds_of
from igscale.latents.format import FIELDS, MANIFEST, TarFormatError, npy_view, torch_dtype
from igscale.latents.norm import LatentNorm
from igscale.storage import StorageError, is_storage_failure, open_storage, split_url

__all__ = ["LatentLoader", "ShardReadError", "finish_stored", "read_shard", "register_s3_gopen",
           "epoch_shard_order", "assign_shards", "load_manifest"]

_CHUNK = 4 << 20  # bytes per read (1-16 MiB measured alike; below 1 MiB the per-block numpy calls dominate)
_AHEAD = 4  # blocks each worker reads ahead of the consumer
Block = tuple[np.ndarray, np.ndarray, list[np.ndarray]]  # keys (n,) int64, labels (n,) int64, per field (n, *shape)


class ShardReadError(RuntimeError):
    """A shard could not be read completely (corrupt, truncated, missing)."""


def register_s3_gopen(endpoint_url: str | None = None) -> None:
    """Let webdataset open s3:// URLs through igscale.storage (tests read shards back with webdataset)."""
    import importlib

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
        store, key = split_url(url, endpoint_url=endpoint_url)
        return store.open_read(key)

    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = gopen_s3  # the module, not the function


def load_manifest(manifest_url: str, endpoint_url: str | None = None) -> tuple[dict, str]:
    """Returns (manifest, base URL that shard keys are relative to)."""
    url = manifest_url.rstrip("/")
    base, _, name = (url if url.endswith(".json") else f"{url}/{MANIFEST}").rpartition("/")
    return json.loads(open_storage(base or ".", endpoint_url=endpoint_url).get_text(name)), base or "."


def epoch_shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    return numpy_rng(seed, Stream.SHARD_ORDER, epoch).permutation(n_shards).tolist()


def assign_shards(order: list[int], rank: int, world_size: int, num_workers: int) -> list[list[int]]:
    """Shards of `rank`, split over its logical workers: [worker][i] -> shard index."""
    mine = order[rank::world_size]
    return [mine[w::num_workers] for w in range(num_workers)]


# ---------------------------------------------------------------------------------------------- shard reading
class _Layout:
    """Why not tarfile: ~120 us per sample here, a fifth of raw GET's rate (bench/bench_loader.py, same run). The
    records (one sample's members) of a format.write_tar shard share members, order and sizes; headers differ only in
    key digits, checksums and the .cls size. So n records are an (n, L) byte matrix checked against the first record
    in a few array ops, the latents views of it. Checksums are not summed: all they cover is compared or parsed and
    checked (the key, the .cls size against its digits). Any other record (damage, a foreign layout) is an error."""

    def __init__(self, head: bytes, fields: tuple[str, ...]):
        """The layout of the record at the start of `head`."""
        pos, key, members = 0, None, {}
        while True:
            if len(h := head[pos:pos + 512]) < 512:
                raise TarFormatError(f"the first record is cut short (or longer than {_CHUNK - 512} bytes)")
            k, _, ext = h[:100].split(b"\0", 1)[0].partition(b".")
            if key is not None and k != key:  # the next record, or the archive's end
                break
            if not (k.isdigit() and len(k) <= 18 and ext and h[156] in b"0\0" and not h[345]):
                raise TarFormatError("not a shard in format.write_tar's layout (its first record)")
            key, size = k, int(h[124:136].strip(b"\0 ") or b"0", 8)
            members[ext.decode()] = (pos, size)
            pos += 512 + -(-size // 512) * 512
        if missing := {*(f"{f}.npy" for f in fields), "cls"} - members.keys():
            raise TarFormatError(f"sample {key.decode()} lacks {sorted(missing)}")
        self.L, self.kl, self.heads, self.cls = pos, len(key), [h for h, _ in members.values()], members["cls"][0]
        mask = np.zeros(pos, np.uint8)  # 0xFF: bytes every record shares with this one (tar and .npy headers)
        for h in self.heads:
            mask[h:h + 512] = 0xFF
            mask[h:h + self.kl] = mask[h + 148:h + 154] = 0  # key digits, checksum digits
        mask[self.cls + 124:self.cls + 135] = 0  # .cls size digits
        self.arrays = []  # per field: (payload start, stop, dtype, shape)
        for f in fields:
            h, size = members[f"{f}.npy"]
            if not (arr := npy_view(head[h + 512:h + 512 + size])).flags.c_contiguous:
                raise TarFormatError(f"{f}.npy is not a C-order array")
            mask[h + 512:h + 512 + size - arr.nbytes] = 0xFF  # the .npy header
            self.arrays.append((h + 512 + size - arr.nbytes, h + 512 + size, arr.dtype, arr.shape))
        words = mask.view(np.uint64)  # compared 8 bytes at a time
        self.cols = np.flatnonzero(words)
        self.mask, self.want = words[self.cols], np.frombuffer(head, np.uint64, pos // 8)[self.cols] & words[self.cols]

    def parse(self, rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, list[np.ndarray]]:
        """rows (n, L) uint8 records -> (v = leading valid records, keys (v,), labels (v,), per field (v, *shape)
        views of rows)."""
        kl, c, h0 = self.kl, self.cls, self.heads[0]
        ok = ((rows.view(np.uint64)[:, self.cols] & self.mask) == self.want).all(1)
        digits = rows[:, h0:h0 + kl].astype(np.int64) - 48  # (n, kl) key digits, the same in every member
        ok &= ((digits >= 0) & (digits <= 9)).all(1)
        for h in self.heads[1:]:
            ok &= (rows[:, h:h + kl] == rows[:, h0:h0 + kl]).all(1)
        sd = rows[:, c + 124:c + 135].astype(np.int64) - 48  # (n, 11) octal digits of the .cls size
        size = sd @ 8 ** np.arange(10, -1, -1)
        ok &= ((sd >= 0) & (sd <= 7)).all(1) & (size >= 1) & (size <= 9)
        lab = rows[:, c + 512:c + 521].astype(np.int64) - 48  # (n, 9): the label's decimal digits, then NULs
        inside = np.arange(9) < size[:, None]
        ok &= np.where(inside, (lab >= 0) & (lab <= 9), lab == -48).all(1)
        v = len(rows) if ok.all() else int(ok.argmin())
        labels = (np.where(inside, lab, 0) * 10 ** np.clip(size[:, None] - 1 - np.arange(9), 0, 8))[:v].sum(1)
        keys = digits[:v] @ 10 ** np.arange(kl - 1, -1, -1)
        return v, keys, labels, [rows[:v, a:b].view(dt).reshape(v, *shape) for a, b, dt, shape in self.arrays]


def _read(src: Any, n: int) -> bytes:
    """n bytes (fewer only at the end): blocks, and so the interleave, must not depend on how the bytes arrive."""
    data = src.read(n)
    while data and len(data) < n and (more := src.read(n - len(data))):
        data += more
    return data


def read_shard(stream: Any, fields: tuple[str, ...]) -> Iterator[Block]:
    """Samples of one freshly opened shard stream (written by format.write_tar) in stored order, as blocks (stored
    dtype; the arrays may be views of the read buffer). TarFormatError at the first damaged record."""
    src = getattr(stream, "raw", stream)  # read past the (still empty) buffer: whole chunks, no extra copy
    data, off, at = _read(src, _CHUNK), 0, 0
    lay = _Layout(data, fields)
    while True:
        n = (len(data) - off) // lay.L
        v, keys, labels, arrays = lay.parse(np.frombuffer(data, np.uint8, n * lay.L, off).reshape(n, lay.L))
        if v:
            yield keys, labels, arrays
        off, at = off + v * lay.L, at + v
        if v < n or not (more := _read(src, max(1, _CHUNK // lay.L) * lay.L - (len(data) - off))):
            break
        data, off = data[off:] + more, 0  # reads after the first end on a record boundary: nothing left over
    rest = data[off:] + _read(src, _CHUNK)
    if len(rest) < 1024 or rest.strip(b"\0"):  # not the archive's end (>= 2 zero blocks, then nothing)
        raise TarFormatError(f"record {at} is damaged, cut short or in another layout")


# ---------------------------------------------------------------------------------------------- workers
def _draws(seed: int, epoch: int, keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (noise seeds (n,) int64, flips (n,) bool) from Stream.POSTERIOR (epoch, key)."""
    s = seeds_of(seed, Stream.POSTERIOR, epoch, last=keys).astype(np.int64)  # 63-bit
    return torch.from_numpy(s), torch.from_numpy(s & 1 == 1)


def _worker_blocks(spec: dict, epoch: int, w: int) -> Iterator[dict]:
    """Logical worker w's blocks {"key", "label", "data": per slot (n, ...), "corrupt": None}, slots = the stored
    pair (finish_on="device") or the finished latent; a skipped corrupt shard as {"corrupt": url}."""
    store = open_storage(spec["base"], endpoint_url=spec["endpoint_url"])
    order = epoch_shard_order(len(spec["shards"]), spec["seed"], epoch)
    for k in assign_shards(order, spec["rank"], spec["world_size"], spec["num_workers"])[w]:
        key, count = spec["shards"][k]["key"], spec["shards"][k]["count"]
        url, n = f"{spec['base']}/{key}", 0
        try:
            with store.open_read(key) as stream:
                for keys, labels, arrays in read_shard(stream, spec["fields"]):
                    if any(a.shape[1:] != spec["shape"] or a.dtype != spec["np_dtype"] for a in arrays):
                        raise ShardReadError(f"latents {arrays[0].shape[1:]} {arrays[0].dtype}, not {spec['shape']} "
                                             f"{spec['np_dtype']} as the manifest says")
                    n += len(keys)
                    if spec["finish_on"] == "workers":  # the per-sample finish to_device runs, on this block
                        seeds, flips = _draws(spec["seed"], epoch, keys)
                        stored = torch.from_numpy(np.stack(arrays, 1)).view(torch_dtype(spec["dtype"]))
                        arrays = [finish_stored(stored, seeds, spec["norm"], flips if spec["flip"] else None).numpy()]
                    yield {"key": keys, "label": labels, "data": arrays, "corrupt": None}
            if n != count:
                raise ShardReadError(f"expected {count} samples, read {n}")
        except Exception as e:  # noqa: BLE001 - classified: storage outage, or a shard that is really bad
            if is_storage_failure(e):  # never skipped, never called corrupt: the data may be fine
                where = spec["endpoint_url"] or "from the environment"
                raise StorageError(f"storage error reading shard {url} (endpoint {where}): {type(e).__name__}: {e}") from e
            if spec["on_corrupt"] == "raise":
                raise ShardReadError(f"corrupt or truncated shard {url}: {type(e).__name__}: {e}") from None
            yield {"corrupt": url}


class _ProcessBlocks(torch.utils.data.IterableDataset):
    """_worker_blocks in torch DataLoader worker processes (worker id = logical worker)."""

    def __init__(self, spec: dict, epoch: int):
        super().__init__()
        self.spec, self.epoch = spec, epoch

    def __iter__(self) -> Iterator[dict]:
        torch.set_num_threads(1)
        return _worker_blocks(self.spec, self.epoch, torch.utils.data.get_worker_info().id)


def _round_robin(streams: list[Iterator[dict]]) -> Iterator[dict]:
    """The streams' items in turn, a finished stream dropping out; each reads its next _AHEAD items in a pool thread
    while the consumer takes the current ones. Tasks are short: the threads end with the epoch, or at exit."""
    take = lambda s: collections.deque(itertools.islice(s, _AHEAD))
    pool = ThreadPoolExecutor(len(streams), thread_name_prefix="latent-loader")
    futs = [pool.submit(take, s) for s in streams]
    ready, active = [collections.deque() for _ in streams], list(range(len(streams)))
    try:
        while active:
            for i in list(active):
                if not ready[i]:
                    ready[i] = futs[i].result()
                    if not ready[i]:
                        active.remove(i)
                        continue
                    futs[i] = pool.submit(take, streams[i])
                yield ready[i].popleft()
    finally:
        pool.shutdown(cancel_futures=True)  # waits for the reads in flight: no stream is still running
        for s in streams:
            s.close()


def finish_stored(stored: torch.Tensor, noise_seed: torch.Tensor, norm: LatentNorm,
                  flip: torch.Tensor | None = None) -> torch.Tensor:
    """A batch's stored pairs (B, 2, C, h, w) (any device) -> (B, C, h, w) float32 normalised model latents.

    flip None (SiT recipe, pairs = posterior mean and std): mean + std * eps, eps of row i from a generator on
    stored's device seeded with noise_seed[i] ((B,) int64; on CPU the workers' and to_device's draws are the same
    numbers). flip (B,) bool (LightningDiT recipe, pairs = sample and mirror): the mirror where set."""
    out = torch.empty(stored.shape[:1] + stored.shape[2:], device=stored.device)  # (B, C, h, w)
    if flip is not None:
        rows = torch.arange(len(flip), device=stored.device) * 2 + flip.to(stored.device, torch.int64)
        return norm.normalize_from(stored.flatten(0, 1).index_select(0, rows), out)
    g = torch.Generator(device=stored.device)
    for i, s in enumerate(noise_seed.tolist()):  # per sample: the draw does not depend on the batch
        out[i].normal_(generator=g.manual_seed(s))
    return norm.normalize_(out.mul_(stored[:, 1]).add_(stored[:, 0]))


# ---------------------------------------------------------------------------------------------- loader
class LatentLoader:
    """Iterate it once per epoch: `for batch in loader:` yields {"latent": (B,C,h,w) float32 normalised,
    "label": (B,) int64} (finish_on="device": "stored", "noise_seed", "flip" instead of "latent", see to_device)
    and ends exactly at the epoch boundary; `loader.epoch` then advances."""

    _LAYOUT = ("num_workers", "rank", "world_size", "batch_size", "seed", "shuffle_buffer")  # fix the stream

    def __init__(self, manifest_url: str, *, batch_size: int, rank: int, world_size: int, num_workers: int = 2,
                 seed: int = 0, shuffle_buffer: int = 1000, endpoint_url: str | None = None,
                 on_corrupt: Literal["raise", "skip"] = "raise", return_keys: bool = False,
                 norm: Literal["auto", "scalar", "per_channel"] | LatentNorm = "auto",
                 worker_type: Literal["thread", "process"] = "thread", finish_on: Literal["workers", "device"] = "workers"):
        if not (0 <= rank < world_size and batch_size > 0 and num_workers >= 0 and shuffle_buffer >= 1):
            raise ValueError(f"need 0 <= rank < world_size (got {rank}, {world_size}), batch_size > 0, num_workers >= 0 "
                             "and shuffle_buffer >= 1")
        for name, value, allowed in (("worker_type", worker_type, ("thread", "process")), ("on_corrupt", on_corrupt,
                                     ("raise", "skip")), ("finish_on", finish_on, ("workers", "device"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        m, base = load_manifest(manifest_url, endpoint_url)
        self.manifest = m
        if len(m["shards"]) < world_size:  # a rank without a shard would wait for data forever
            raise ValueError(f"{len(m['shards'])} shard(s) for {world_size} ranks: use a smaller --samples-per-shard")
        self.norm = norm if isinstance(norm, LatentNorm) else LatentNorm.from_manifest(m, norm)
        self.batch_size, self.num_workers, self.rank, self.world_size = batch_size, num_workers, rank, world_size
        self.worker_type, self.return_keys = worker_type, return_keys  # return_keys: also "key" (B,) int64
        self.num_samples: int = m["num_samples"]
        self.latent_shape: tuple[int, ...] = tuple(m["latent"]["shape"])
        dtype = m["latent"]["dtype"]
        self._spec = dict(  # what the workers need (picklable, for process workers)
            base=base, endpoint_url=endpoint_url, shards=[{"key": s["key"], "count": s["count"]} for s in m["shards"]],
            fields=FIELDS[m["mode"]], flip=m["mode"] == "sample_flip", dtype=dtype, norm=self.norm,
            shape=self.latent_shape, np_dtype=np.dtype(np.uint16 if dtype == "bfloat16" else dtype), seed=seed,
            rank=rank, world_size=world_size, num_workers=max(1, num_workers), batch_size=batch_size,
            shuffle_buffer=shuffle_buffer, on_corrupt=on_corrupt, finish_on=finish_on)
        self.corrupt_shards: set[str] = set()
        self.epoch, self._batches, self._pool = 0, 0, []  # _pool: [bytearray, weakref to its window], see _window

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self._batches, **{k: self._spec[k] for k in self._LAYOUT}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k in self._LAYOUT:
            if d.get(k) != self._spec[k]:  # (a state of the loader before issue #15 has no shuffle_buffer)
                raise ValueError(f"loader state has {k}={d.get(k)} but this loader has {self._spec[k]}; exact resume "
                                 "needs the same rank layout, workers, batch size, shuffle window and seed")
        self.epoch, self._batches = d["epoch"], d["batches"]

    def samples_per_rank(self, epoch: int | None = None) -> list[int]:
        order = epoch_shard_order(len(self._spec["shards"]), self._spec["seed"], self.epoch if epoch is None else epoch)
        return [sum(self._spec["shards"][k]["count"] for k in order[r::self.world_size]) for r in range(self.world_size)]

    def batches_per_epoch(self, rank: int | None = None, epoch: int | None = None) -> int:
        """Batches `rank` yields in `epoch` (assuming no corrupt shards)."""
        return -(-self.samples_per_rank(epoch)[self.rank if rank is None else rank] // self.batch_size)

    def _items(self, epoch: int) -> Iterator[dict]:
        sp = self._spec
        if self.num_workers == 0:
            yield from _worker_blocks(sp, epoch, 0)
        elif self.worker_type == "thread":
            yield from _round_robin([_worker_blocks(sp, epoch, w) for w in range(self.num_workers)])
        else:  # collate_fn=dict: a picklable identity for dict items
            yield from torch.utils.data.DataLoader(_ProcessBlocks(sp, epoch), batch_size=None, collate_fn=dict,
                                                   num_workers=self.num_workers, prefetch_factor=_AHEAD, in_order=True)

    def _batch(self, w: dict[str, np.ndarray], sl: slice, epoch: int) -> dict[str, Any]:
        sp, keys = self._spec, w["key"][sl]
        out = {"label": torch.from_numpy(w["label"][sl]), **({"key": torch.from_numpy(keys)} if self.return_keys else {})}
        if sp["finish_on"] == "workers":
            return {**out, "latent": torch.from_numpy(w["data"][sl, 0])}
        seeds, flips = _draws(sp["seed"], epoch, keys)
        return {**out, "stored": torch.from_numpy(w["data"][sl]).view(torch_dtype(sp["dtype"])), "noise_seed": seeds,
                "flip": flips if sp["flip"] else None}

    def _window(self, shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
        """A window's buffer. A fresh one costs the kernel zeroing its pages (~6 us a sample here, as much as
        filling it), so buffers come back once no batch uses them: each window is a new array over a pooled
        bytearray, every view of it (and tensor made from one) keeps that array alive, and its weakref dies with them."""
        n = int(np.prod(shape)) * dt.itemsize
        entry = next((e for e in self._pool if len(e[0]) == n and e[1]() is None), None)
        if entry is None:  # a few at most: one still in use when the pool is full just leaves it
            entry = [bytearray(n), None]
            self._pool = [*self._pool[-3:], entry]
        entry[1] = weakref.ref(flat := np.frombuffer(entry[0], dt))
        return flat.reshape(shape)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sp, bs, e = self._spec, self.batch_size, self.epoch
        size = -(-sp["shuffle_buffer"] // bs) * bs  # window: whole batches, so batches are views of it
        slots, dt = (2, sp["np_dtype"]) if sp["finish_on"] == "device" else (1, np.dtype(np.float32))
        rng = numpy_rng(sp["seed"], Stream.WINDOW_SHUFFLE, e, self.rank, 0)
        done, wi, fill, win, perm = self._batches, 0, 0, None, None  # done: batches delivered before a resume

        def emit(w: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
            for i in range(0, len(w["key"]), bs):
                if (g := wi * size // bs + i // bs) >= done:
                    self._batches = g + 1
                    yield self._batch(w, slice(i, i + bs), e)

        with contextlib.closing(self._items(e)) as items:  # closing the epoch iterator stops the workers
            for item in items:
                if item["corrupt"]:
                    self.corrupt_shards.add(item["corrupt"])
                    continue
                n, at = len(item["key"]), 0
                while at < n:
                    if fill == 0:  # a new window; one whose batches were all delivered is not filled
                        perm = rng.permutation(size)  # stream position fill + j -> window row perm[fill + j]
                        win = None if (wi + 1) * size <= done * bs else {
                            "key": np.empty(size, np.int64), "label": np.empty(size, np.int64),
                            "data": self._window((size, slots, *sp["shape"]), dt)}  # (window, slots, C, h, w)
                    m = min(n - at, size - fill)
                    if win is not None:
                        rows = perm[fill:fill + m]
                        win["key"][rows], win["label"][rows] = item["key"][at:at + m], item["label"][at:at + m]
                        for j, a in enumerate(item["data"]):
                            win["data"][rows, j] = a[at:at + m]
                    fill, at = fill + m, at + m
                    if fill == size:
                        yield from emit(win) if win is not None else ()
                        wi, fill = wi + 1, 0
        if fill and win is not None:  # the short last window: its rows, in the order of their places
            yield from emit({k: v[np.sort(perm[:fill])] for k, v in win.items()})
        self.epoch, self._batches = e + 1, 0

    def to_device(self, batch: dict[str, Any], device: torch.device | str,
                  non_blocking: bool = True) -> dict[str, torch.Tensor]:
        """A batch on `device` as {"latent": (B,C,h,w) float32, "label": (B,) int64 (, "key")}: finished there
        (posterior draw or flip, normalisation) with finish_on="device", else a copy."""
        out = {"label": batch["label"].to(device, non_blocking=non_blocking)}
        if "stored" in batch:
            out["latent"] = finish_stored(batch["stored"].to(device, non_blocking=non_blocking),
                                          batch["noise_seed"], self.norm, batch["flip"])
        else:
            out["latent"] = batch["latent"].to(device, torch.float32, non_blocking=non_blocking)
        return out | ({"key": batch["key"]} if "key" in batch else {})
