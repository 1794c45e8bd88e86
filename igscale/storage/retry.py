"""What counts as a storage outage (retried within a bounded time) versus bad data, and the retry budgets."""
from __future__ import annotations

import os
import sys

from igscale.storage.base import StorageError

# S3 error codes that mean "try again later" rather than "you asked for something wrong".
_RETRY_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "BadGateway", "GatewayTimeout",
}


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


