"""On-storage format of precomputed latent datasets: WebDataset tar shards + a JSON manifest written last.

Sample `<key>` (the image's index in the sorted source file list, 9 digits) holds:
  mode "mean_std":    <key>.mean.npy, <key>.std.npy   posterior mean/std, (C, h, w)
  mode "sample_flip": <key>.latent.npy, <key>.flip.npy one posterior sample of the image and of its mirror
  <key>.cls                                           class index as decimal text
bfloat16 arrays are stored as uint16 .npy (numpy has no bfloat16); the manifest's latent dtype says how to view them.
Tars are written deterministically (sorted members, zero mtimes/owners), so equal content gives equal sha256.
"""
from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "MODES", "DTYPES", "FIELDS", "shard_key", "sidecar_key", "encode_array", "decode_array",
           "write_tar", "iter_tar_samples", "npy_view", "TarFormatError", "torch_dtype"]

FORMAT = "igscale-latents/1"
MODES = ("mean_std", "sample_flip")
DTYPES = ("float32", "float16", "bfloat16")
FIELDS = {"mean_std": ("mean", "std"), "sample_flip": ("latent", "flip")}
MANIFEST = "manifest.json"


def shard_key(k: int) -> str:
    return f"shards/shard-{k:06d}.tar"


def sidecar_key(k: int) -> str:
    """Per-shard completion record, written right after its shard (sha256, count, stats, corrupt inputs)."""
    return f"shards/shard-{k:06d}.json"


def sample_key(index: int) -> str:
    return f"{index:09d}"


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def encode_array(t: torch.Tensor, dtype: str) -> bytes:
    """(C,h,w) tensor -> .npy bytes in the stored dtype."""
    t = t.detach().to("cpu", torch_dtype(dtype)).contiguous()
    arr = t.view(torch.uint16).numpy() if dtype == "bfloat16" else t.numpy()
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple, int]] = {}


def npy_view(data: bytes) -> np.ndarray:
    """Parse .npy bytes. Every sample of a dataset has the same header, so it is parsed once (np.load's header
    parser costs more than the copy) and the payload is viewed in place."""
    hlen = 10 + int.from_bytes(data[8:10], "little") if data[6:7] == b"\x01" else None
    head = data[:hlen] if hlen else None
    if head is None or head not in _NPY_HEADERS:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if head is not None and not arr.dtype.hasobject and arr.flags.c_contiguous:
            _NPY_HEADERS[head] = (arr.dtype, arr.shape, hlen)
        return arr
    dt, shape, off = _NPY_HEADERS[head]
    return np.frombuffer(data, dtype=dt, offset=off).reshape(shape)


def decode_array(data: bytes, dtype: str) -> torch.Tensor:
    """.npy bytes -> float32 tensor."""
    arr = npy_view(data)
    if dtype == "bfloat16":
        return torch.from_numpy(arr.astype(np.uint16, copy=False).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(arr.copy()).float()


class TarFormatError(ValueError):
    pass


_ZERO_BLOCK = b"\0" * 512


def _read_exact(stream: Any, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # raw streams may return short reads
        more = stream.read(n - len(data))
        if not more:
            raise TarFormatError(f"unexpected end of data ({len(data)} of {n} bytes)")
        data += more
    return data


def iter_tar_samples(stream: Any) -> Iterator[dict[str, Any]]:
    """Stream a POSIX tar and group consecutive members by key (name up to the first '.' of the basename),
    like webdataset's tarfile_to_samples, but parsing headers with plain slicing: Python's tarfile costs
    ~20-70 us per member, which bounds the loader at a few thousand samples/s per worker."""
    current: dict[str, Any] | None = None
    pax_path = None
    while True:
        head = stream.read(512)
        if not head or head == _ZERO_BLOCK:
            break
        if len(head) < 512:
            raise TarFormatError(f"truncated tar header ({len(head)} bytes)")
        chk = int(head[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        if chk != sum(head[:148]) + 256 + sum(head[156:]):  # the checksum field counts as 8 spaces
            raise TarFormatError("tar header checksum mismatch (corrupt shard)")
        size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = head[156:157]
        data = _read_exact(stream, size)
        if size % 512:
            _read_exact(stream, 512 - size % 512)
        if kind in (b"x", b"g"):  # pax extended header: may carry a long path for the next member
            for rec in data.decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    pax_path = rec.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0"):
            continue
        name = pax_path or (head[345:500].split(b"\0", 1)[0] + b"/" if head[345] else b"").decode() + \
            head[:100].split(b"\0", 1)[0].decode()
        pax_path = None
        base = name.rsplit("/", 1)[-1]
        key, _, ext = base.partition(".")
        key = name[: len(name) - len(base)] + key
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[ext] = data
    if current is not None:
        yield current


def write_tar(samples: list[dict[str, Any]]) -> bytes:
    """samples: dicts with "__key__" and extension -> bytes. Returns the tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext in sorted(k for k in s if not k.startswith("__")):
                data = s[ext]
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
