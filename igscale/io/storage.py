"""One small storage layer for datasets, checkpoints and evaluation outputs: local paths and `s3://bucket/prefix`.

`open_storage(url)` picks the backend from the URL scheme. Keys are '/'-separated and relative to the prefix.

Atomicity: local writes go to a temp file in the target folder and are `os.replace`d into place. S3 writes
are atomic by protocol: an object becomes visible only when its PUT (or CompleteMultipartUpload) succeeds, and
a failed multipart upload is aborted, so a reader never sees a partial object. Datasets additionally write
their manifest last, so a half-written dataset is never mistaken for a complete one.

boto3 is imported lazily so that model code and local runs never need it.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = ["StorageError", "Storage", "LocalStorage", "S3Storage", "open_storage", "split_url", "is_s3_url"]

T = TypeVar("T")

# S3 error codes that mean "try again later" rather than "you asked for something wrong".
_RETRY_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "BadGateway", "GatewayTimeout",
}


# The process umask, read once at import (os.umask can only be read by setting it, which is racy once threads run).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _temp_file(dst: Path) -> tuple[int, str]:
    """A temp file next to `dst` with the mode a plain open() would give (mkstemp makes 0600, which would hide
    checkpoints and exports from teammates on a shared filesystem)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


class StorageError(RuntimeError):
    """A storage problem the user must fix (missing credentials, missing bucket, missing key...)."""


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Storage:
    """Common interface. Subclasses implement the primitive operations."""

    def join(self, *parts: str) -> str:
        return _join(*parts)

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
        fd, tmp = _temp_file(dst)
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


# ----------------------------------------------------------------------------------------------------------
def _is_retryable(exc: BaseException) -> bool:
    import botocore.exceptions as bex

    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return err.get("Code") in _RETRY_CODES or status >= 500 or status == 429
    return isinstance(
        exc,
        (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError, bex.ConnectTimeoutError,
         bex.ResponseStreamingError, bex.IncompleteReadError, ConnectionError, TimeoutError),
    )


def is_storage_failure(exc: BaseException) -> bool:
    """Whether `exc` (or its cause) is the storage failing (outage, exhausted retries, credentials), as opposed to
    the stored bytes being bad. A missing object (404) counts as bad data."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageError):
            return True
        try:
            import botocore.exceptions as bex

            if isinstance(exc, bex.ClientError):
                return _status(exc) not in (404, 416) and _code(exc) not in ("NoSuchKey", "NotFound", "404")
            if isinstance(exc, bex.BotoCoreError):
                return True
        except ImportError:
            pass
        if _is_retryable_builtin(exc):
            return True
        exc = exc.__cause__
    return False


def _is_retryable_builtin(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError))


def _status(exc: BaseException) -> int:
    resp = getattr(exc, "response", None) or {}
    return resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0


def _code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))


_CLIENTS: dict = {}


def retry_budget_s() -> float:
    """Seconds a storage operation keeps retrying transient failures (IGSCALE_STORAGE_RETRY_S, default 600)."""
    raw = os.environ.get("IGSCALE_STORAGE_RETRY_S", "600")
    try:
        v = float(raw)
    except ValueError:
        raise StorageError(f"IGSCALE_STORAGE_RETRY_S={raw!r} is not a number of seconds") from None
    if not v >= 0:
        raise StorageError(f"IGSCALE_STORAGE_RETRY_S must be >= 0, got {raw!r}")
    return v


def request_timeout_s() -> float:
    """Socket timeout of one S3 request (IGSCALE_STORAGE_TIMEOUT_S, default 20): a stalled server is retried after
    this long instead of hanging."""
    raw = os.environ.get("IGSCALE_STORAGE_TIMEOUT_S", "20")
    try:
        v = float(raw)
    except ValueError:
        raise StorageError(f"IGSCALE_STORAGE_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if not v > 0:
        raise StorageError(f"IGSCALE_STORAGE_TIMEOUT_S must be > 0, got {raw!r}")
    return v


def _warn(msg: str) -> None:
    print(f"[igscale storage] {msg}", file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def _cached_client(endpoint_url: str | None, request_attempts: int) -> Any:
    """boto3 clients are thread-safe but cost ~0.4 s of CPU to build: share one per process and settings.
    The key includes the credential env vars so a changed identity gets a new client."""
    env = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                            "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE"))
    timeout = request_timeout_s()
    key = (os.getpid(), endpoint_url, request_attempts, timeout, env)
    if key not in _CLIENTS:
        import boto3
        from botocore.config import Config

        cfg = Config(
            retries={"max_attempts": request_attempts, "mode": "standard"},
            connect_timeout=min(5.0, timeout), read_timeout=timeout, max_pool_connections=32,
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        session = boto3.session.Session()
        region = session.region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        _CLIENTS[key] = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
    return _CLIENTS[key]


class S3Storage(Storage):
    """S3 (or any S3-compatible server) under `s3://bucket/prefix`.

    One retry policy for every operation (reads, writes, listings, streamed bodies, multipart transfers):
    a transient failure (connection refused or reset, a timeout, a stalled server, 5xx, throttling) is retried
    with exponential backoff + jitter until `retry_s` seconds (IGSCALE_STORAGE_RETRY_S, default 600) have passed
    since the operation's first failure; botocore makes one attempt per call, so the bounds do not multiply. A
    line goes to stderr on the first retry and every 30 s after; past the budget a StorageError names the
    operation, the URL and the endpoint. Non-transient errors (403, 404, a bad request) are raised at once.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 retry_s: float | None = None, base_delay: float = 0.2, max_delay: float = 10.0,
                 request_attempts: int = 1, multipart_threshold: int = 64 << 20,
                 multipart_chunksize: int = 16 << 20):
        if not bucket:
            raise StorageError("S3 URL has no bucket (expected s3://bucket/prefix)")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
                             or os.environ.get("S3_ENDPOINT_URL") or None)
        self.retry_s = retry_budget_s() if retry_s is None else float(retry_s)
        self.base_delay, self.max_delay = base_delay, max_delay
        self.request_attempts = request_attempts
        self.multipart_threshold, self.multipart_chunksize = multipart_threshold, multipart_chunksize
        self._client = None
        self._client_pid = None

    def __repr__(self) -> str:
        return f"S3Storage({self.url()!r}, endpoint_url={self.endpoint_url!r})"

    def __getstate__(self) -> dict:
        # Clients are not picklable and must not be shared across fork(); rebuild lazily in the new process.
        return {**self.__dict__, "_client": None, "_client_pid": None}

    @property
    def client(self) -> Any:
        if self._client is None or self._client_pid != os.getpid():
            self._client = _cached_client(self.endpoint_url, self.request_attempts)
            self._client_pid = os.getpid()
        return self._client

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def url(self, key: str = "") -> str:
        k = self._key(key)
        return f"s3://{self.bucket}/{k}" if k else f"s3://{self.bucket}"

    def _retry(self, fn: Callable[[], T], what: str, key: str | None = None) -> T:
        t0 = last_log = None
        attempt = 0
        while True:
            try:
                out = fn()
                if t0 is not None:
                    _warn(f"S3 {what} {self._where(key)} recovered after {time.monotonic() - t0:.0f} s")
                return out
            except Exception as e:  # noqa: BLE001 - classified below
                if not _is_retryable(e):
                    raise
                now = time.monotonic()
                if t0 is None:
                    t0 = last_log = now
                    _warn(f"S3 {what} {self._where(key)} failing: {_short(e)}; retrying for up to "
                          f"{self.retry_s:.0f} s (IGSCALE_STORAGE_RETRY_S)")
                elif now - last_log >= 30:
                    last_log = now
                    _warn(f"S3 {what} {self._where(key)} failing for {now - t0:.0f} s: {_short(e)}")
                if now - t0 >= self.retry_s:
                    raise StorageError(f"S3 {what} of {self._where(key)} failed for {now - t0:.0f} s (endpoint "
                                       f"{self.endpoint_url or 'AWS default'}): {_short(e)}") from e
                delay = min(self.max_delay, self.base_delay * 2**min(attempt, 10)) * (0.5 + random.random())
                time.sleep(max(0.0, min(delay, t0 + self.retry_s - now)))
                attempt += 1

    def _where(self, key: str | None) -> str:
        return self.url(key) if key is not None else self.url()

    def check(self) -> None:
        import boto3
        import botocore.exceptions as bex

        if boto3.session.Session().get_credentials() is None:
            raise StorageError(
                f"no AWS credentials found for {self.url()}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE / a credentials file)")
        try:
            self._retry(lambda: self.client.head_bucket(Bucket=self.bucket), "head_bucket")
        except bex.ClientError as e:
            st = _status(e)
            if st == 404 or _code(e) in ("NoSuchBucket", "404"):
                raise StorageError(f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}") from e
            if st in (401, 403):
                raise StorageError(
                    f"access to bucket {self.bucket!r} denied at {self.endpoint_url or 'AWS'} "
                    f"(wrong credentials or no permission): {e}") from e
            raise StorageError(f"cannot access {self.url()}: {e}") from e
        except (bex.EndpointConnectionError, ConnectionError) as e:
            raise StorageError(f"cannot reach S3 endpoint {self.endpoint_url or 'AWS'}: {e}") from e

    def _not_found(self, e: BaseException, key: str) -> BaseException:
        if _status(e) == 404 or _code(e) in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"no such object: {self.url(key)}")
        return e

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize, max_concurrency=4)

    def put_bytes(self, key: str, data: bytes) -> None:
        if len(data) >= self.multipart_threshold:
            self._retry(lambda: self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key),
                                                           Config=self._transfer_config()), "upload", key)
        else:
            self._retry(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data), "put",
                        key)

    def put_file(self, key: str, local_path: str | os.PathLike) -> None:
        # upload_file switches to multipart above the threshold and aborts the upload on failure.
        self._retry(lambda: self.client.upload_file(str(local_path), self.bucket, self._key(key),
                                                    Config=self._transfer_config()), "upload_file", key)

    def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        try:
            return self._retry(get, "get", key)
        except Exception as e:
            raise self._not_found(e, key) from e

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        dst = Path(local_path).absolute()
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_file(dst)
        os.close(fd)
        try:
            self._retry(lambda: self.client.download_file(self.bucket, self._key(key), tmp,
                                                          Config=self._transfer_config()), "download", key)
            os.replace(tmp, dst)
        except Exception as e:
            Path(tmp).unlink(missing_ok=True)
            raise self._not_found(e, key) from e

    def open_read(self, key: str) -> IO[bytes]:
        """A buffered binary stream that resumes with a ranged GET if the connection drops mid-object."""
        raw = _S3RangeResumingReader(self, self._key(key))
        try:
            raw.open_at(0)
        except Exception as e:
            raise self._not_found(e, key) from e
        return io.BufferedReader(raw, buffer_size=1 << 20)

    def _head(self, key: str) -> dict:
        try:
            return self._retry(lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)), "head", key)
        except Exception as e:
            raise self._not_found(e, key) from e

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        base = self._key("")
        full = _join(base, prefix) if prefix else (base + "/" if base else "")
        if prefix.endswith("/"):
            full += "/"

        def run() -> list[str]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    out.append(k[len(base) + 1:] if base else k)
            return out

        return sorted(self._retry(run, "list"))

    def delete(self, key: str) -> None:
        self._retry(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)), "delete", key)


class _S3RangeResumingReader(io.RawIOBase):
    """Raw stream over one S3 object. A connection reset mid-body re-opens at the current offset (Range GET)."""

    def __init__(self, storage: S3Storage, full_key: str):
        self.s, self.key, self.pos, self.body, self.length = storage, full_key, 0, None, None

    def _open(self, pos: int) -> None:
        kw = {"Range": f"bytes={pos}-"} if pos else {}
        resp = self.s.client.get_object(Bucket=self.s.bucket, Key=self.key, **kw)
        if self.length is None:
            self.length = int(resp["ContentLength"])
        self.body, self.pos = resp["Body"], pos

    def open_at(self, pos: int) -> None:
        self.s._retry(lambda: self._open(pos), "get", self._rel)

    @property
    def _rel(self) -> str:  # the key relative to the storage prefix, for messages
        p = self.s.prefix
        return self.key[len(p) + 1:] if p and self.key.startswith(p + "/") else self.key

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes as the HTTP layer returns them (no copy into a caller buffer)."""
        if self.length is not None and self.pos >= self.length:
            return b""
        n = None if size is None or size < 0 else size

        def read_once() -> bytes:
            if self.body is None:  # the last attempt broke the connection: resume at the current offset
                self._open(self.pos)
            try:
                return self.body.read(n)
            except Exception:
                self.body = None
                raise

        chunk = self.s._retry(read_once, "read", self._rel)
        if not chunk and self.pos < (self.length or 0):
            raise ConnectionError(f"s3://{self.s.bucket}/{self.key}: stream ended at {self.pos} of {self.length}")
        self.pos += len(chunk)
        return chunk

    def readinto(self, b: Any) -> int:
        chunk = self.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None
        super().close()


# ----------------------------------------------------------------------------------------------------------
def open_storage(url: str | os.PathLike, *, endpoint_url: str | None = None) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; `file:///path` or a plain path -> LocalStorage."""
    url = os.fspath(url)
    if is_s3_url(url):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        return S3Storage(bucket, prefix, endpoint_url=endpoint_url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        raise StorageError(f"unsupported storage URL scheme in {url!r} (use s3://bucket/prefix or a local path)")
    return LocalStorage(url)


def split_url(url: str, *, endpoint_url: str | None = None) -> tuple[Storage, str]:
    """Split an object URL into (storage of its parent folder, basename key)."""
    url = os.fspath(url)
    head, _, name = url.rstrip("/").rpartition("/")
    if not name or (is_s3_url(url) and head == "s3:/"):
        raise StorageError(f"{url!r} does not name an object")
    return open_storage(head or ".", endpoint_url=endpoint_url), name
