"""Checkpoints written by someone else are not trusted (real S3 server and local storage):

- a `latest` that is not one of our tags (an absolute path, `..`) is refused, and nothing outside the staging folder
  is deleted or written;
- a rank marker listing a key that climbs out of the tag is refused before any download;
- a checkpoint missing one rank's file, or holding a truncated one, is refused by every rank before loading;
- trainer, EMA and export state load with torch.load(weights_only=True): a planted pickle payload does not run;
- local storage respects the umask (teammates can read checkpoints on a shared filesystem).
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import stat

import pytest
import torch

from igscale.checkpoint.store import Checkpointer, CheckpointError, tag_for

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _plant(ck, key, text):
    """What an attacker would store next to the crafted pointer (S3 servers may refuse such keys themselves)."""
    try:
        ck.storage.put_text(key, text)
    except Exception:  # noqa: BLE001 - refused by the server or the filesystem: the check must hold regardless
        pass


def _writer(staging, tag):
    os.makedirs(os.path.join(staging, tag, "sub"), exist_ok=True)
    for i, rel in enumerate(("a.pt", "sub/b.pt")):
        torch.save({"i": torch.arange(100 + i)}, os.path.join(staging, tag, rel))


@pytest.mark.parametrize("where", ["s3", "local"])
def test_crafted_latest_is_refused_and_touches_nothing(where, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/ck" if where == "s3" else str(tmp_path / "ck")
    ck = Checkpointer(url, str(tmp_path / "stage"))
    ck.save(1, _writer)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    for bad in (str(victim), "../victim", "step_1/../../victim", "step_000000001/x"):
        ck.storage.put_text("latest", bad)
        _plant(ck, f"{bad.strip('/')}/COMPLETE", json.dumps({"world_size": 1}))
        with pytest.raises(CheckpointError, match="not a checkpoint tag"):
            ck.latest_tag()
        with pytest.raises(CheckpointError):
            ck.download(bad)
    assert (victim / "keep.txt").read_text() == "precious" and sorted(os.listdir(victim)) == ["keep.txt"]


def test_marker_keys_outside_the_tag_are_refused(s3_bucket, tmp_path):
    ck = Checkpointer(f"s3://{s3_bucket}/ck", str(tmp_path / "stage"))
    tag = ck.save(1, _writer)
    ck.storage.put_text(f"{tag}/_ranks/00000.json", json.dumps({"files": ["a.pt", "../../../escaped.pt"]}))
    _plant(ck, f"{tag}/../../../escaped.pt", "x")
    with pytest.raises(CheckpointError, match="would leave"):
        ck.download(tag, str(tmp_path / "dl"))
    assert not list(tmp_path.rglob("escaped.pt"))


def test_missing_or_truncated_rank_file_is_refused_before_loading(s3_bucket, tmp_path):
    ck = Checkpointer(f"s3://{s3_bucket}/ck", str(tmp_path / "stage"))
    tag = ck.save(1, _writer)
    assert sorted(ck.verify(tag)) == ["a.pt", "sub/b.pt"]
    good = ck.storage.get_bytes(f"{tag}/sub/b.pt")
    ck.storage.put_bytes(f"{tag}/sub/b.pt", good[:-5] + b"XXXXX")  # same size, other bytes
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        ck.download(tag, str(tmp_path / "dl"))
    ck.storage.put_bytes(f"{tag}/sub/b.pt", b"short")
    with pytest.raises(CheckpointError, match="sub/b.pt has 5 bytes"):
        ck.download(tag, str(tmp_path / "dl"))
    ck.storage.delete(f"{tag}/sub/b.pt")
    with pytest.raises(CheckpointError, match="missing sub/b.pt"):
        ck.download(tag, str(tmp_path / "dl"))
    ck.storage.delete(f"{tag}/_ranks/00000.json")
    with pytest.raises(CheckpointError, match="0 rank markers for a world size of 1"):
        ck.verify(tag)


class _Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(os.environ["IGSCALE_TEST_PWNED"]),))


def test_planted_pickle_in_ema_or_trainer_state_does_not_run(tmp_path, monkeypatch):
    from igscale.checkpoint.layout import consolidate_ema

    flag = tmp_path / "pwned"
    monkeypatch.setenv("IGSCALE_TEST_PWNED", str(flag))
    planted = tmp_path / "ema_rank00000.pt"
    torch.save({"ema": _Payload()}, planted)
    with pytest.raises(pickle.UnpicklingError):
        consolidate_ema(str(tmp_path))
    assert not flag.exists()
    # every torch.load of stored state in the package refuses pickled code
    unsafe = [str(p.relative_to(ROOT)) for d in ("igscale", "data_pipeline") for p in (ROOT / d).rglob("*.py")
              if "weights_only=False" in p.read_text()]
    assert not unsafe, unsafe
    # the trainer's own files are plain tensors and containers, which weights_only=True accepts
    state = {"state": {"step": 3}, "loader": {"epoch": 0, "received": [1, 2], "tails_held": []},
             "torch_rng": torch.get_rng_state()}
    torch.save(state, tmp_path / "trainer_rank00000.pt")
    assert torch.load(tmp_path / "trainer_rank00000.pt", weights_only=True)["loader"]["received"] == [1, 2]


def test_local_storage_respects_the_umask(tmp_path):
    from igscale.storage import open_storage
    from igscale.storage.base import _UMASK

    st = open_storage(str(tmp_path / "store"))
    st.put_text("x.json", "{}")
    src = tmp_path / "src.bin"
    src.write_bytes(b"1")
    st.put_file("y.bin", str(src))
    for name in ("x.json", "y.bin"):
        mode = stat.S_IMODE(os.stat(tmp_path / "store" / name).st_mode)
        assert mode == 0o666 & ~_UMASK, oct(mode)
    ck = Checkpointer(str(tmp_path / "ck"), str(tmp_path / "stage"))
    ck.save(2, _writer)
    mode = stat.S_IMODE(os.stat(tmp_path / "ck" / tag_for(2) / "a.pt").st_mode)
    assert mode == 0o666 & ~_UMASK, oct(mode)
