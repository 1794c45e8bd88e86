"""Storage layer against a local folder and a real SeaweedFS S3 server (tests/fixtures/s3server.py)."""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading

import pytest

from igscale.storage import LocalStorage, S3Storage, StorageError, open_storage, split_url


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/some/prefix")


def test_roundtrip_list_delete(store, tmp_path):
    store.check()
    assert store.list() == []
    store.put_bytes("a/x.bin", b"hello")
    store.put_text("b.json", '{"k": 1}')
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    store.put_file("a/y.bin", src)
    assert store.get_bytes("a/x.bin") == b"hello"
    assert store.get_text("b.json") == '{"k": 1}'
    assert store.exists("a/y.bin") and not store.exists("a/nope")
    assert store.size("a/y.bin") == 3000
    assert store.list() == ["a/x.bin", "a/y.bin", "b.json"]
    assert store.list("a/") == ["a/x.bin", "a/y.bin"]
    with store.open_read("a/y.bin") as f:
        assert f.read(10) == src.read_bytes()[:10] and f.read() == src.read_bytes()[10:]
    store.get_file("a/y.bin", tmp_path / "dl" / "y.bin")
    assert (tmp_path / "dl" / "y.bin").read_bytes() == src.read_bytes()
    store.put_bytes("a/x.bin", b"overwritten")
    assert store.get_bytes("a/x.bin") == b"overwritten"
    store.delete("a/x.bin")
    assert store.list() == ["a/y.bin", "b.json"]
    for op in (store.get_bytes, store.size, store.open_read):
        with pytest.raises(FileNotFoundError, match="a/x.bin"):
            op("a/x.bin")
    assert store.join("a/", "/b", "c") == "a/b/c"
    assert store.url("k").endswith("some/prefix/k" if isinstance(store, S3Storage) else "root/k")


def test_url_parsing(tmp_path):
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    s = open_storage("s3://bkt/p/q/", endpoint_url="http://127.0.0.1:1")
    assert (s.bucket, s.prefix, s.url("k"), s.endpoint_url) == ("bkt", "p/q", "s3://bkt/p/q/k", "http://127.0.0.1:1")
    parent, name = split_url("s3://bkt/p/manifest.json")
    assert (parent.url(), name) == ("s3://bkt/p", "manifest.json")
    with pytest.raises(StorageError, match="scheme"):
        open_storage("gs://x/y")


def test_local_write_is_atomic(tmp_path):
    store = LocalStorage(tmp_path)
    store.put_bytes("f", b"old")

    def fail(f):
        f.write(b"partial")
        raise OSError("disk died")

    with pytest.raises(OSError):
        store._atomic_write("f", fail)
    assert store.get_bytes("f") == b"old" and os.listdir(tmp_path) == ["f"]  # no temp file left behind


def test_s3_pagination_and_multipart(s3_bucket, tmp_path):
    store = S3Storage(s3_bucket, "pg", multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    keys = [f"k{i:04d}" for i in range(1010)]  # > 1000: needs a second list page
    for k in keys[:5]:
        store.put_bytes(k, b"x")
    # Bulk create through the raw client (fast), then list through the storage layer.
    c = store.client
    for k in keys[5:]:
        c.put_object(Bucket=s3_bucket, Key=f"pg/{k}", Body=b"")
    assert store.list() == keys
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 << 20))
    store.put_file("big.bin", big)
    head = c.head_object(Bucket=s3_bucket, Key="pg/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts: it really was a multipart upload
    with store.open_read("big.bin") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(big.read_bytes()).digest()


def test_s3_check_errors(s3_server, s3_bucket, monkeypatch):
    S3Storage(s3_bucket).check()
    with pytest.raises(StorageError, match="does not exist"):
        S3Storage("no-such-bucket-xyz").check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match="denied"):
        S3Storage(s3_bucket).check()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no AWS credentials"):
        S3Storage(s3_bucket).check()


class FaultyProxy:
    """Loopback TCP proxy in front of the S3 server. The first `n_faults` connections fail
    ("503": an HTTP 503 SlowDown reply; "reset": a TCP RST), later ones are forwarded byte for byte."""

    def __init__(self, target_port: int, n_faults: int, mode: str):
        self.target, self.n_faults, self.mode, self.count = target_port, n_faults, mode, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            if self.count <= self.n_faults:
                if self.mode == "503":
                    conn.recv(65536)
                    body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                else:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            up = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b, gate=None):
        """Forward a -> b until either side closes; `gate` (a threading.Event) holds the bytes while it is clear."""
        try:
            while data := a.recv(65536):
                if gate is not None:
                    gate.wait()
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_s3_retries_through_faults(s3_server, s3_bucket, mode):
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    S3Storage(s3_bucket, "r").put_bytes("obj", b"payload")
    # 3 faults > botocore's 2 attempts per call: the outer retry policy must retry as well.
    proxy = FaultyProxy(port, n_faults=3, mode=mode)
    try:
        store = S3Storage(s3_bucket, "r", endpoint_url=f"http://127.0.0.1:{proxy.port}",
                          request_attempts=2, base_delay=0.01)
        assert store.get_bytes("obj") == b"payload"
        assert proxy.count >= 4
        # Without retries the same fault surfaces as an error.
        proxy.count = 0
        nore = S3Storage(s3_bucket, "r", endpoint_url=f"http://127.0.0.1:{proxy.port}",
                         request_attempts=1, retry_s=0)
        with pytest.raises(Exception):  # noqa: B017 - botocore error type depends on the fault
            nore.get_bytes("obj")
    finally:
        proxy.close()
