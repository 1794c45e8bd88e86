"""S3 (or any S3-compatible server) storage with one bounded retry policy for outages.

boto3 is imported lazily so that model code and local runs never need it.
"""
from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from igscale.storage.base import Storage, StorageError, join_key, temp_file_beside
from igscale.storage.retry import _code, _is_retryable, _short, _status, _warn, request_timeout_s, retry_budget_s

T = TypeVar("T")

_CLIENTS: dict = {}


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
        return join_key(self.prefix, key)

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
        fd, tmp = temp_file_beside(dst)
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
        full = join_key(base, prefix) if prefix else (base + "/" if base else "")
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

