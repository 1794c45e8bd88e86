"""One small storage layer for datasets, checkpoints and evaluation outputs: local paths and `s3://bucket/prefix`.

`open_storage(url)` picks the backend from the URL scheme. Keys are '/'-separated and relative to the prefix.

Atomicity: local writes go to a temp file in the target folder and are `os.replace`d into place. S3 writes
are atomic by protocol: an object becomes visible only when its PUT (or CompleteMultipartUpload) succeeds, and
a failed multipart upload is aborted, so a reader never sees a partial object. Datasets additionally write
their manifest last, so a half-written dataset is never mistaken for a complete one.

boto3 is imported lazily so that model code and local runs never need it.
"""
from __future__ import annotations

import os

from igscale.storage.base import Storage, StorageError, is_s3_url
from igscale.storage.local import LocalStorage
from igscale.storage.retry import is_storage_failure, request_timeout_s, retry_budget_s
from igscale.storage.s3 import S3Storage

__all__ = ["StorageError", "Storage", "LocalStorage", "S3Storage", "open_storage", "split_url", "is_s3_url",
           "is_storage_failure", "retry_budget_s", "request_timeout_s", "USER_ERRORS"]

try:  # wrong credentials, a missing bucket, an unreachable endpoint: one line, not a botocore traceback
    from botocore.exceptions import BotoCoreError, ClientError

    _S3_ERRORS: tuple = (BotoCoreError, ClientError)
except ImportError:  # boto3 is optional for local-only use
    _S3_ERRORS = ()

# What a command reports as one line instead of a traceback: bad input, a missing file, a storage failure.
USER_ERRORS = (ValueError, FileNotFoundError, StorageError, *_S3_ERRORS)


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
