"""Local-filesystem storage: atomic writes through a temp file in the target folder and `os.replace`."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

from igscale.storage.base import Storage, StorageError, temp_file_beside


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        if not key:
            return self.root
        parts = key.split("/")
        if key.startswith("/") or ".." in parts or "\\" in key:
            raise StorageError(f"key {key!r} would leave the storage root {self.root}")
        return self.root / key

    def url(self, key: str = "") -> str:
        return str(self._path(key))

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root} exists and is not a directory")

    def _atomic_write(self, key: str, write: Callable[[IO[bytes]], None]) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(dst)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, local_path: str | os.PathLike) -> None:
        with open(local_path, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, 8 << 20))

    def _existing(self, key: str) -> Path:
        p = self._path(key)
        if not p.is_file():
            raise FileNotFoundError(f"no such object: {p}")
        return p

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        src = self._existing(key)
        LocalStorage(Path(local_path).absolute().parent).put_file(Path(local_path).name, src)

    def open_read(self, key: str) -> IO[bytes]:
        return open(self._existing(key), "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in files:
                key = f if rel == "." else f"{rel}/{f}"
                if key.startswith(prefix) and not (f.startswith(".") and f.endswith(".tmp")):
                    out.append(key)
        return sorted(out)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

