"""ADM-format npz files: sample batches (`arr_0`: uint8 NHWC images, optional `arr_1`: int labels) and
reference batches (`mu`, `sigma`, `mu_s`, `sigma_s`, `arr_0`), as read by guided-diffusion's evaluator.py.

Large batches (50k x 256 x 256 x 3 = 9.8 GB) are streamed: arrays are written chunk by chunk into a zip64
entry and read back in batches from the .npy header, never holding the whole array in memory.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator

import numpy as np

__all__ = [
    "REF_KEYS", "NpzFormatError", "read_header", "validate_images", "validate_sample_npz", "validate_ref_npz",
    "iter_batches", "write_npz_streaming", "load_ref_stats",
]

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
REF_KEYS = (*STAT_KEYS, "arr_0")
POOL_DIM, SPATIAL_DIM = 2048, 2023


class NpzFormatError(ValueError):
    """An npz file does not follow the ADM layout. The message names the file, key and the problem."""


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise NpzFormatError(f"unsupported .npy format version {version}")


def read_header(path: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `key` in the npz at `path`, without reading its data."""
    with zipfile.ZipFile(path) as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            raise NpzFormatError(f"{path}: missing key {key!r} (has {sorted(n[:-4] for n in zf.namelist())})")
        with zf.open(name) as f:
            shape, fortran, dtype = _read_npy_header(f)
            if fortran:
                raise NpzFormatError(f"{path}: {key} is Fortran-ordered; expected C order")
    return tuple(shape), np.dtype(dtype)


def validate_images(shape, dtype, where: str) -> None:
    """arr_0 must be uint8 of shape (N, H, W, 3) with N >= 1."""
    if np.dtype(dtype) != np.uint8:
        raise NpzFormatError(f"{where}: arr_0 must be uint8 images in [0, 255], got dtype {np.dtype(dtype)}")
    if len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
        raise NpzFormatError(
            f"{where}: arr_0 must have shape (N, H, W, 3) (NHWC, RGB), got {tuple(shape)}"
            + (" - looks like NCHW; transpose to NHWC" if len(shape) == 4 and shape[1] == 3 else "")
        )


def validate_sample_npz(path: str) -> tuple[int, ...]:
    """Check a sample batch; returns the arr_0 shape."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample batch not found: {path}")
    try:
        shape, dtype = read_header(path, "arr_0")
    except zipfile.BadZipFile as e:
        raise NpzFormatError(f"{path}: not an npz (zip) file") from e
    validate_images(shape, dtype, path)
    return shape


def validate_ref_npz(path: str) -> bool:
    """Check a reference batch: arr_0 images, plus either all four ADM statistics with the right shapes (2048-d pool,
    2023-d spatial) or none of them. Returns whether the statistics are stored; without them the evaluator computes
    them from arr_0's features, as the ADM evaluator does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference batch not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except zipfile.BadZipFile as e:
        raise NpzFormatError(f"{path}: not an npz (zip) file") from e
    if "arr_0" in names and not any(k in names for k in STAT_KEYS):
        validate_images(*read_header(path, "arr_0"), path)
        return False
    missing = [k for k in REF_KEYS if k not in names]
    if missing:
        raise NpzFormatError(
            f"{path}: reference batch is missing key(s) {missing}; an ADM reference batch (e.g. "
            f"VIRTUAL_imagenet256_labeled.npz) has {list(REF_KEYS)}"
        )
    want = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
            "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    for k, shp in want.items():
        got, dt = read_header(path, k)
        if got != shp or not np.issubdtype(dt, np.floating):
            raise NpzFormatError(f"{path}: {k} must be a float array of shape {shp}, got {dt} {got}")
    validate_images(*read_header(path, "arr_0"), path)
    return True


def load_ref_stats(path: str) -> dict[str, np.ndarray] | None:
    """The stored ADM statistics as float64, or None for a reference batch that stores only images."""
    if not validate_ref_npz(path):
        return None
    with np.load(path) as z:
        return {k: z[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")}


def iter_batches(path: str, key: str, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """Yield rows [start, stop) of array `key` in batches, reading straight from the zip entry."""
    shape, dtype = read_header(path, key)
    stop = shape[0] if stop is None else min(stop, shape[0])
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        _read_npy_header(f)
        if start:
            f.seek(f.tell() + start * row_bytes)
        i = start
        while i < stop:
            n = min(batch_size, stop - i)
            buf = f.read(n * row_bytes)
            if len(buf) != n * row_bytes:
                raise NpzFormatError(f"{path}: {key} is truncated at row {i}")
            yield np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:])
            i += n


def write_npz_streaming(
    path: str,
    key: str,
    shape: tuple[int, ...],
    dtype,
    chunks: Iterable[np.ndarray],
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write an npz whose array `key` (of known total `shape`) arrives in row chunks, plus small `extra` arrays.

    Written to `path + '.tmp'` and renamed, so a reader never sees a partial file.
    """
    dtype = np.dtype(dtype)
    tmp = path + ".tmp"
    rows = 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
            np.lib.format.write_array_header_2_0(f, header)
            for c in chunks:
                c = np.ascontiguousarray(c, dtype=dtype)
                if c.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"chunk shape {c.shape} does not match {shape}")
                f.write(c.tobytes())
                rows += len(c)
        if rows != shape[0]:
            raise ValueError(f"wrote {rows} rows of {key}, expected {shape[0]}")
        for k, v in (extra or {}).items():
            with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(v), allow_pickle=False)
    os.replace(tmp, path)
