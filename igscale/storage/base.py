"""The storage interface: `Storage` (keys are '/'-separated, relative to a prefix) and its errors."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO

# The process umask, read once at import (os.umask can only be read by setting it, which is racy once threads run).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temp_file_beside(dst: Path) -> tuple[int, str]:
    """A temp file next to `dst` with the mode a plain open() would give (mkstemp makes 0600, which would hide
    checkpoints and exports from teammates on a shared filesystem)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


class StorageError(RuntimeError):
    """A storage problem the user must fix (missing credentials, missing bucket, missing key...)."""


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Storage:
    """Common interface. Subclasses implement the primitive operations."""

    def join(self, *parts: str) -> str:
        return join_key(*parts)

    def url(self, key: str = "") -> str:
        raise NotImplementedError

    def check(self) -> None:
        """Raise StorageError now if the destination cannot be used (before any expensive work starts)."""

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, key: str, local_path: str | os.PathLike) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        raise NotImplementedError

    def open_read(self, key: str) -> IO[bytes]:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")


# ----------------------------------------------------------------------------------------------------------
