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
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "MODES", "DTYPES", "FIELDS", "shard_key", "sidecar_key", "encode_array", "decode_array",
           "write_tar", "npy_view", "TarFormatError", "torch_dtype"]

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
