"""Vectorised reader for latent shards: whole blocks of samples per numpy operation instead of per-member Python.

Every sample of a shard written by `write_tar` has the same tar layout: the same members in the same order, the
same padded sizes, and headers that differ only in the key digits, the checksum and (for `.cls`) the size. So a
block of n complete samples is an (n, L) byte matrix: headers are validated against the first sample's headers
with a few array comparisons, keys/labels/checksums are parsed column-wise, and the arrays are strided views of
the payload columns. Anything irregular (another writer's layout, the end-of-archive blocks, damage) hands the
rest of the shard to the member-by-member parser `iter_tar_samples`, which either reads it or raises
TarFormatError; both paths yield the same samples.

    for block in read_sample_blocks(stream, fields=("mean", "std")):
        block.keys (n,) int64, block.labels (n,) int64, block.arrays[i] (n, *shape) stored dtype
        (the arrays may be views of the read buffer: copy before asking for the next block)
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.legacy_loader.tarparse import iter_tar_samples
from igscale.latents.format import TarFormatError, npy_view

__all__ = ["SampleBlock", "read_sample_blocks"]

_SCALAR_BLOCK = 64  # samples per block on the member-by-member path


@dataclass
class SampleBlock:
    keys: np.ndarray  # (n,) int64: sample keys (source image indices)
    labels: np.ndarray  # (n,) int64
    arrays: list[np.ndarray]  # per field: (n, *shape) in the stored dtype


class _Layout:
    """Byte layout of one sample record, taken from the first sample of a shard."""

    def __init__(self, template: np.ndarray, members: list[tuple[str, int, int, int]], key_len: int,
                 npy_heads: dict[str, tuple[int, np.dtype, tuple]]):
        # template: (L,) uint8, the first sample's record; only its layout and fixed bytes are kept
        self.members = members  # (ext, header offset, payload size, padded size), in record order
        self.key_len = key_len
        self.npy_heads = npy_heads  # ext -> (npy header length, dtype, shape)
        self.record = template.size
        # Bytes that must equal the template in every record: each tar header and .npy header, except the key
        # digits, the checksum and (for .cls) the size field. Compared as 64-bit words under a bit mask.
        fixed = np.zeros(self.record, bool)
        for ext, ho, _, _ in members:
            fixed[ho:ho + 512] = True
            fixed[ho:ho + key_len] = False
            fixed[ho + 148:ho + 154] = False  # checksum digits; the NUL and space after them are fixed
            if ext == "cls":
                fixed[ho + 124:ho + 136] = False
            if ext in npy_heads:
                fixed[ho + 512:ho + 512 + npy_heads[ext][0]] = True
        words = fixed.reshape(-1, 8).any(1)
        self.cols = np.flatnonzero(words)  # 64-bit word columns holding fixed bytes
        self.mask = np.where(fixed, 0xFF, 0).astype(np.uint8).view(np.uint64)[self.cols]
        self.want = template.view(np.uint64)[self.cols] & self.mask
        # The varying bytes, gathered in one go: member 0's key digits, the other members' key digits, each
        # checksum's 6 octal digits, and .cls's 11 octal size digits. Their values come from one matmul.
        n_m = len(members)
        ho = [m[1] for m in members]
        cls_i = [i for i, m in enumerate(members) if m[0] == "cls"]
        cols = [np.arange(h, h + key_len) for h in ho]
        cols += [np.arange(h + 148, h + 154) for h in ho]
        cols += [np.arange(ho[cls_i[0]] + 124, ho[cls_i[0]] + 135)] if cls_i else []
        self.dcols = np.concatenate(cols)
        k_o = n_m * key_len  # offset of the checksum digits
        s_o = k_o + 6 * n_m  # offset of the size digits
        self.hi = np.full(self.dcols.size, 7, np.int64)
        self.hi[:k_o] = 9
        self.key_other = np.arange(key_len, k_o)  # must repeat member 0's key digits
        out = 2 + n_m + 2  # key, key byte sum, one checksum per member, size, size byte sum
        weights = np.zeros((self.dcols.size, out), np.int64)
        weights[:key_len, 0] = 10 ** np.arange(key_len - 1, -1, -1)
        weights[:key_len, 1] = 1
        for m in range(n_m):
            weights[k_o + 6 * m:k_o + 6 * (m + 1), 2 + m] = 8 ** np.arange(5, -1, -1)
        if cls_i:
            weights[s_o:s_o + 11, out - 2] = 8 ** np.arange(10, -1, -1)
            weights[s_o:s_o + 11, out - 1] = 1
        self.weights = weights.astype(np.float64)  # BLAS matmul; every value < 2^53, so exact
        # Expected checksum of member m = its fixed bytes' sum + 256 (the field itself counts as 8 spaces)
        # + its key bytes + (.cls) its size field bytes (digits + 48 each; the NUL after them is checked apart).
        in_sum = fixed.copy()
        for h in ho:
            in_sum[h + 148:h + 156] = False
        self.chk_base = np.array([int(template[h:h + 512][in_sum[h:h + 512]].sum(dtype=np.int64)) + 256
                                  + 48 * key_len + (48 * 11 if i in cls_i else 0) for i, h in enumerate(ho)])
        self.chk_size = np.array([i in cls_i for i in range(n_m)])
        self.cls = (ho[cls_i[0]], min(18, members[cls_i[0]][3])) if cls_i else None
        self.fields = {m[0]: (m[1], m[2]) for m in members}

    @classmethod
    def detect(cls, buf: memoryview, need: set[str]) -> _Layout | None | bool:
        """Layout of the record starting at buf[0]; None if the fast path does not apply; False if the first
        record (and the header after it) is not all in `buf` yet."""
        pos, key, members, npy_heads = 0, None, [], {}
        while pos + 512 <= len(buf):
            head = bytes(buf[pos:pos + 512])
            if head[156:157] not in (b"0", b"\0") or head[345] or head[148:156][6:] != b"\0 ":
                break  # pax/gnu headers, prefixed names, other checksum styles: member-by-member path
            name = head[:100].split(b"\0", 1)[0]
            k, dot, ext = name.partition(b".")
            if not dot or not k.isdigit() or b"/" in name or len(k) > 15:  # keys < 2^53: exact in float64
                break
            if key is None:
                key = k
            elif k != key:
                break
            size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            padded = -(-size // 512) * 512
            e = ext.decode()
            if pos + 512 + padded > len(buf):
                return False
            data = bytes(buf[pos + 512:pos + 512 + size])
            if e.endswith(".npy"):
                hlen, arr = _npy_header(data)
                if arr is None:
                    return None
                npy_heads[e] = (hlen, arr.dtype, arr.shape)
            elif e == "cls" and not (0 < size <= 18 and data.isdigit()):
                return None
            members.append((e, pos, size, padded))
            pos += 512 + padded
        if key is not None and pos + 512 > len(buf):
            return False  # the record may go on past the buffer
        if key is None or not need <= {m[0] for m in members}:
            return None
        return cls(np.frombuffer(buf, np.uint8, count=pos).copy(), members, len(key), npy_heads)

    def parse(self, rows: np.ndarray, fields: tuple[str, ...]) -> tuple[int, SampleBlock]:
        """rows: (n, L) uint8 complete records. Returns (number of leading valid rows v, their SampleBlock)."""
        n, kl = rows.shape[0], self.key_len
        ok = ((rows.view(np.uint64)[:, self.cols] & self.mask) == self.want).all(1)
        d = rows[:, self.dcols].astype(np.float64) - 48  # (n, K) digit values
        ok &= ((d >= 0) & (d <= self.hi)).all(1)
        ok &= (d[:, self.key_other].reshape(n, len(self.members) - 1, kl) == d[:, None, :kl]).all((1, 2))
        v = (d @ self.weights).astype(np.int64)  # (n, 2 + members + 2)
        keys = v[:, 0]
        expected = self.chk_base + v[:, 1:2] + self.chk_size * v[:, -1:]
        ok &= (v[:, 2:-2] == expected).all(1)
        labels = np.zeros(n, np.int64)
        if self.cls is not None:  # decimal text of 1..18 digits after an 11-digit octal size and a NUL
            ho, w = self.cls
            sz = v[:, -2]
            ok &= (rows[:, ho + 135] == 0) & (sz >= 1) & (sz <= w)
            dd = rows[:, ho + 512:ho + 512 + w].astype(np.int64) - 48
            inside = np.arange(w) < sz[:, None]
            ok &= (((dd >= 0) & (dd <= 9)) | ~inside).all(1)
            pw = np.clip(sz[:, None] - 1 - np.arange(w), 0, 18)  # digit i counts 10^(size-1-i)
            labels = np.where(inside, dd * 10 ** pw, 0).sum(1)
        ok[1:] &= keys[1:] != keys[:-1]  # equal neighbours would be one sample to a tar reader
        v = n if ok.all() else int(np.argmin(ok))
        arrays = []
        for f in fields:
            ho, size = self.fields[f"{f}.npy"]
            hlen, dt, shape = self.npy_heads[f"{f}.npy"]
            arrays.append(rows[:v, ho + 512 + hlen:ho + 512 + size].view(dt).reshape(v, *shape))
        return v, SampleBlock(keys[:v], labels[:v], arrays)


def _npy_header(data: bytes) -> tuple[int, np.ndarray | None]:
    if data[:6] != b"\x93NUMPY" or data[6:7] != b"\x01":
        return 0, None
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError:
        return 0, None
    if arr.dtype.hasobject or not arr.flags.c_contiguous:
        return 0, None
    return 10 + int.from_bytes(data[8:10], "little"), arr


class _Replay(io.RawIOBase):
    """`head` bytes first, then the rest of `stream`: hands a partly read shard to the member-by-member parser."""

    def __init__(self, head: bytes, stream: Any):
        self.head, self.stream = memoryview(head), stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if len(self.head):
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        return self.stream.readinto(b)


def _scalar_blocks(stream: Any, fields: tuple[str, ...]) -> Iterator[SampleBlock]:
    need = [f"{f}.npy" for f in fields] + ["cls"]
    batch: list[dict] = []

    def block() -> SampleBlock:
        keys = np.array([int(s["__key__"]) for s in batch], np.int64)
        labels = np.array([int(s["cls"]) for s in batch], np.int64)
        return SampleBlock(keys, labels, [np.stack([npy_view(s[f"{f}.npy"]) for s in batch]) for f in fields])

    for s in iter_tar_samples(io.BufferedReader(stream, 1 << 20)):
        missing = [f for f in need if f not in s]
        if missing:  # a tar cut mid-sample yields a sample without all of its members
            raise TarFormatError(f"sample {s.get('__key__')!r} lacks {missing}")
        if not s["__key__"].isdigit():
            raise TarFormatError(f"sample key {s['__key__']!r} is not a decimal image index")
        batch.append(s)
        if len(batch) == _SCALAR_BLOCK:
            yield block()
            batch = []
    if batch:
        yield block()


def read_sample_blocks(stream: Any, fields: tuple[str, ...], chunk_bytes: int = 4 << 20) -> Iterator[SampleBlock]:
    """Samples of one freshly opened shard stream, in stored order, as SampleBlocks.

    Reads `chunk_bytes` at a time from the unbuffered stream under `stream` and parses records where they lie in
    the chunk (no copy); only a record cut by a chunk boundary is assembled. (A read-ahead thread measured no
    gain on loopback: the kernel's socket buffer already keeps the connection streaming while we parse.)"""
    src = getattr(stream, "raw", stream)  # fresh BufferedReader: nothing buffered yet, so read past it
    yield from _read_blocks(src, fields, chunk_bytes)


def _read_blocks(src: Any, fields: tuple[str, ...], chunk_bytes: int) -> Iterator[SampleBlock]:
    need = {f"{f}.npy" for f in fields} | {"cls"}
    carry = bytearray()  # bytes of a record cut by the chunk boundary (all data read so far before detection)
    layout, eof = None, False
    while not eof:
        size = chunk_bytes
        if isinstance(layout, _Layout):  # whole records per read, so (full) reads end on a record boundary
            size = max(1, chunk_bytes // layout.record) * layout.record - len(carry)
        chunk = src.read(size)
        eof = not chunk
        if not isinstance(layout, _Layout):  # None: not tried yet; False: needs more bytes
            carry += chunk
            layout = _Layout.detect(memoryview(carry), need)
            if layout is False and not eof:
                continue
            if not layout:
                break
            data, off, carry = bytes(carry), 0, bytearray()
        else:
            data, off = chunk, 0
            if carry:  # complete the record begun in the previous chunk
                off = min(layout.record - len(carry), len(chunk))
                carry += chunk[:off]
                if len(carry) < layout.record:
                    continue
                v, block = layout.parse(np.frombuffer(carry, np.uint8).reshape(1, -1), fields)
                if not v:  # (a fresh bytearray: the parsed one is still exported to numpy)
                    carry = bytearray(carry) + chunk[off:]
                    break
                yield block
                carry = bytearray()
        n = (len(data) - off) // layout.record
        rows = np.frombuffer(data, np.uint8, count=n * layout.record, offset=off).reshape(n, layout.record)
        v, block = layout.parse(rows, fields)
        if v:
            yield block
        carry = bytearray(data[off + v * layout.record:])
        if v < n:  # an irregular record: the member-by-member parser takes over from it
            break
    yield from _scalar_blocks(_Replay(bytes(carry), src), fields)
