"""Storage outages are survived with a visible message, never mistaken for corrupt data, and bounded in time.

The real S3 server sits behind a loopback proxy that can refuse connections (its listening socket closed: a real
ECONNREFUSED) or stall them (connections accepted, no bytes forwarded), then come back on the same port.
"""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from bench.device_latents import write_random_latents
from tests.test_storage import FaultyProxy

pytestmark = pytest.mark.slow


class OutageProxy:
    def __init__(self, target_port: int):
        self.target = target_port
        self.flowing = threading.Event()
        self.flowing.set()
        self.conns: list[socket.socket] = []
        self.port = None
        self._listen()

    def _listen(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port or 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, args=(self.sock,), daemon=True).start()

    def _serve(self, sock) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b) -> None:
        FaultyProxy._pipe(a, b, self.flowing)

    def refuse(self) -> None:
        try:  # shutdown wakes the thread blocked in accept(); close alone would leave the port listening
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:  # established connections die too (a restarted server)
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []

    def stall(self) -> None:
        self.flowing.clear()

    def restore(self) -> None:
        if self.sock.fileno() == -1:
            self._listen()
        self.flowing.set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def outage_env(s3_server, s3_bucket, monkeypatch):
    proxy = OutageProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    monkeypatch.setenv("IGSCALE_STORAGE_TIMEOUT_S", "1.5")  # a stalled request is retried after 1.5 s
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.restore()
    proxy.refuse()


def _latents(bucket: str) -> str:
    return write_random_latents(f"s3://{bucket}/lat", num=96, shape=(4, 8, 8), mode="sample_flip", per_shard=16,
                                num_classes=10, dtype="float32")


def _loader(manifest: str, endpoint: str, on_corrupt: str):
    from igscale.latents.loader import LatentLoader

    return LatentLoader(manifest, batch_size=8, rank=0, world_size=1, num_workers=0, seed=0, shuffle_buffer=16,
                        endpoint_url=endpoint, on_corrupt=on_corrupt, return_keys=True)


@pytest.mark.parametrize("kind", ["refuse", "stall"])
def test_outage_while_reading_loses_nothing_in_skip_mode(outage_env, s3_bucket, kind, capfd):
    proxy = outage_env
    manifest = _latents(s3_bucket)
    loader = _loader(manifest, proxy.endpoint, "skip")
    keys, it = [], iter(loader)
    keys += list(next(it)["key"])
    getattr(proxy, kind)()
    timer = threading.Timer(6.0, proxy.restore)
    timer.start()
    t0 = time.monotonic()
    for batch in it:
        keys += list(batch["key"])
    timer.join()
    assert time.monotonic() - t0 >= 5.0  # the epoch really waited for the storage
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 96  # every sample once: nothing skipped
    assert not loader.corrupt_shards
    err = capfd.readouterr().err
    assert "[igscale storage] S3" in err and "failing" in err and "recovered after" in err, err[-2000:]


@pytest.mark.parametrize("on_corrupt", ["skip", "raise"])
def test_outage_past_the_budget_is_a_storage_error_naming_the_endpoint(outage_env, s3_bucket, monkeypatch,
                                                                       on_corrupt):
    from igscale.storage import StorageError

    proxy = outage_env
    manifest = _latents(s3_bucket)
    monkeypatch.setenv("IGSCALE_STORAGE_RETRY_S", "3")
    loader = _loader(manifest, proxy.endpoint, on_corrupt)
    it = iter(loader)
    next(it)
    proxy.refuse()
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        for _ in it:
            pass
    msg = str(ei.value)
    assert proxy.endpoint in msg and "corrupt" not in msg and "failed for" in msg, msg
    assert time.monotonic() - t0 < 60  # bounded: the budget, not retries multiplied by timeouts
    assert not loader.corrupt_shards


def test_checkpoint_survives_an_outage_mid_save(outage_env, s3_bucket, tmp_path, capfd):
    import torch

    from igscale.checkpoint.store import Checkpointer, tag_for

    proxy = outage_env
    ck = Checkpointer(f"s3://{s3_bucket}/ck", str(tmp_path / "stage"), endpoint_url=proxy.endpoint)

    def write(staging, tag):
        os.makedirs(os.path.join(staging, tag), exist_ok=True)
        for i in range(6):
            torch.save({"w": torch.arange(1000 + i)}, os.path.join(staging, tag, f"f{i}.pt"))
        proxy.refuse()  # the server goes away as the upload starts, and comes back 5 s later
        threading.Timer(5.0, proxy.restore).start()

    assert ck.save(3, write) == tag_for(3)
    assert ck.latest_tag() == tag_for(3) and sorted(ck.verify(tag_for(3))) == [f"f{i}.pt" for i in range(6)]
    assert "failing" in capfd.readouterr().err


def _train(tmp_path, name, manifest, ckpt, endpoint, steps):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = tmp_path / name
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", AWS_ENDPOINT_URL=endpoint,
               S3_ENDPOINT_URL=endpoint)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "igscale.cli.main", "train", "--config", os.path.join(root, "configs", "tiny_cpu.yaml"),
           f"run_dir={run_dir}", f"data.manifest_url={manifest}", f"checkpoint.url={ckpt}", "train.global_batch=8",
           f"train.total_steps={steps}", "checkpoint.every_steps=40", "sample.every_steps=0", "data.num_workers=0",
           "logging.every_steps=1"]
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), run_dir / "train_log.jsonl"


def _steps_done(path) -> int:
    import json

    try:
        return max((json.loads(line)["step"] for line in open(path)), default=0)
    except (OSError, ValueError):
        return 0


def test_training_through_outages_matches_an_uninterrupted_run(outage_env, s3_server, s3_bucket, tmp_path):
    """Refused, then stalled storage during `igscale train` (data reads and checkpoint uploads go through the proxy):
    the run waits, says so, and its loss trajectory equals a run without outages."""
    import json

    proxy = outage_env
    manifest = _latents(s3_bucket)
    steps, outage_s = 120, float(os.environ.get("IGSCALE_TEST_OUTAGE_S", "6"))
    ref, ref_log = _train(tmp_path, "ref", manifest, f"s3://{s3_bucket}/ck_ref", s3_server.endpoint_url, steps)
    assert ref.wait(300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    p, log = _train(tmp_path, "out", manifest, f"s3://{s3_bucket}/ck_out", proxy.endpoint, steps)
    for at, kind in ((10, "refuse"), (38, "stall")):  # the second one spans the step-40 checkpoint
        deadline = time.monotonic() + 240
        while _steps_done(log) < at and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        getattr(proxy, kind)()
        time.sleep(outage_s)
        proxy.restore()
    assert p.wait(600) == 0, (tmp_path / "out.log").read_text()[-3000:]
    out = (tmp_path / "out.log").read_text()
    assert "[igscale storage]" in out and "failing" in out and "recovered after" in out, out[-3000:]
    losses = [{r["step"]: r["train/loss"] for r in map(json.loads, open(f))} for f in (ref_log, log)]
    assert sorted(losses[0]) == list(range(1, steps + 1)) and losses[0] == losses[1]
