"""LatentLoader against shards on the real S3 test server: exact epochs, split by rank and worker, exact resume,
read-time sampling and normalisation, corrupt/truncated shards."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from data_pipeline.run import parse_args, precompute
from igscale.io.loader import LatentLoader, assign_shards, epoch_shard_order
from igscale.io.shard_format import decode_array
from igscale.io.storage import open_storage
from tests.test_pipeline import job_args, make_tree, make_vae


@pytest.fixture(scope="module")
def flip_dataset(s3_server):
    """24 images -> 5 shards (5,5,5,5,4) in the LightningDiT layout (sample + mirrored sample), bfloat16."""
    mp = pytest.MonkeyPatch()
    for k, v in s3_server.env.items():
        mp.setenv(k, v)
    try:
        bucket = s3_server.create_bucket()
        make_tree(open_storage(f"s3://{bucket}/images"), corrupt=False)
        make_vae(open_storage(f"s3://{bucket}/weights/vae"))
        cfg, _ = parse_args(job_args(bucket, "flip", mode="sample_flip", dtype="bfloat16"))
        m = precompute(cfg, executor="inline")["manifest"]
        yield bucket, m
    finally:
        mp.undo()


def _stored(m) -> dict[int, dict]:
    import webdataset as wds

    from igscale.io.loader import register_s3_gopen

    register_s3_gopen()
    out = {}
    for s in m["shards"]:
        for smp in wds.tarfile_to_samples()(iter([{"url": s["url"]}])):
            out[int(smp["__key__"])] = smp
    return out


def _loader(bucket, **kw):
    args = dict(batch_size=4, rank=0, world_size=1, num_workers=2, shuffle_buffer=6, return_keys=True)
    return LatentLoader(f"s3://{bucket}/flip/manifest.json", **{**args, **kw})


def _epochs(ld, n):
    while ld.epoch < n:
        yield from ld


def test_epochs_exactly_once_across_ranks_and_workers(s3_bucket, flip_dataset):
    bucket, m = flip_dataset
    assert m["num_samples"] == 24 and [s["count"] for s in m["shards"]] == [5, 5, 5, 5, 4]
    stored = _stored(m)
    mean, std = torch.tensor(m["latent_stats"]["mean"]), torch.tensor(m["latent_stats"]["std"])
    orders = []
    for epoch in range(3):
        seen, order = [], []
        for rank in range(2):
            ld = _loader(bucket, rank=rank, world_size=2, norm="per_channel")
            assert ld.num_samples == 24 and ld.latent_shape == (4, 4, 4)
            ld.load_state_dict({**ld.state_dict(), "epoch": epoch})
            batches = list(ld)
            assert ld.epoch == epoch + 1  # the epoch ends exactly here
            assert len(batches) == ld.batches_per_epoch(rank, epoch)
            assert all(len(b["label"]) == 4 for b in batches[:-1]) and 1 <= len(batches[-1]["label"]) <= 4
            for b in batches:
                for z, y, k in zip(b["latent"], b["label"], b["key"].tolist()):
                    s = stored[k]
                    assert int(s["cls"]) == y
                    # read-time choice of the stored sample or its mirror, then per-channel normalisation
                    cands = [(decode_array(s[f], "bfloat16") - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
                             for f in ("latent.npy", "flip.npy")]
                    assert any(torch.allclose(z, c, atol=1e-6) for c in cands)
                seen += b["key"].tolist()
                order += b["key"].tolist()
        assert sorted(seen) == sorted(stored), f"epoch {epoch}: every image exactly once across ranks"
        orders.append(order)
    assert orders[0] != orders[1]  # shard order and shuffle change per epoch
    # Shard split: ranks own disjoint shards, workers disjoint subsets of their rank's shards.
    order = epoch_shard_order(5, 0, 0)
    parts = [w for r in range(2) for w in assign_shards(order, r, 2, 2)]
    assert sorted(x for p in parts for x in p) == list(range(5))


def test_same_seed_same_stream_and_num_workers_0(flip_dataset):
    bucket, _ = flip_dataset
    a = [b["key"].tolist() for b in _loader(bucket)]
    b = [b["key"].tolist() for b in _loader(bucket)]
    c = [b["key"].tolist() for b in _loader(bucket, seed=1)]
    assert a == b and a != c
    z = [b["key"].tolist() for b in _loader(bucket, num_workers=0)]
    assert sorted(sum(z, [])) == sorted(sum(a, []))


def test_resume_equals_uninterrupted_stream(flip_dataset):
    bucket, _ = flip_dataset
    full = list(_epochs(_loader(bucket, batch_size=3), 2))
    n0 = _loader(bucket, batch_size=3).batches_per_epoch(epoch=0)
    # mid-epoch, inside the end-of-epoch tail batches, exactly at the boundary, and in the next epoch
    for k in sorted({1, 3, n0 - 1, n0, n0 + 2}):
        ld = _loader(bucket, batch_size=3)
        got = list(itertools.islice(_epochs(ld, 2), k))
        state = json.loads(json.dumps(ld.state_dict()))  # must survive a checkpoint round trip
        fresh = _loader(bucket, batch_size=3)
        fresh.load_state_dict(state)
        got += list(_epochs(fresh, 2))
        assert len(got) == len(full), k
        for x, y in zip(got, full):
            assert torch.equal(x["key"], y["key"]) and torch.equal(x["latent"], y["latent"]), k
    with pytest.raises(ValueError, match="batch_size"):
        _loader(bucket, batch_size=5).load_state_dict(state)


def test_truncated_and_garbage_shards(flip_dataset):
    bucket, m = flip_dataset
    store = open_storage(f"s3://{bucket}")
    for s in m["shards"]:  # a private copy of the dataset to damage
        store.put_bytes(f"bad/{s['key']}", store.get_bytes(f"flip/{s['key']}"))
    store.put_text("bad/manifest.json", json.dumps(m))
    data = store.get_bytes("bad/shards/shard-000001.tar")
    store.put_bytes("bad/shards/shard-000001.tar", data[: len(data) // 2 + 100])  # truncated mid-member
    store.put_bytes("bad/shards/shard-000003.tar", b"this is not a tar file" * 100)
    url1 = f"s3://{bucket}/bad/shards/shard-000001.tar"
    url3 = f"s3://{bucket}/bad/shards/shard-000003.tar"
    mk = lambda **kw: LatentLoader(f"s3://{bucket}/bad/manifest.json", batch_size=4, rank=0, world_size=1,
                                   num_workers=2, shuffle_buffer=2, return_keys=True, **kw)
    with pytest.raises(Exception, match=r"shard-00000[13]\.tar") as ei:
        list(mk())
    assert "corrupt or truncated shard s3://" in str(ei.value)
    ld = mk(on_corrupt="skip")
    keys = [k for b in ld for k in b["key"].tolist()]
    assert ld.corrupt_shards == {url1, url3}
    good = {k for i, s in enumerate(m["shards"]) if i not in (1, 3)
            for k in range(s["first_index"], s["last_index"] + 1)}
    assert good <= set(keys) and len(keys) == len(set(keys))  # other shards complete, nothing duplicated


def test_tar_reader_matches_tarfile():
    """The loader's tar parser against Python's tarfile on shards with ustar and pax (long name) members."""
    import io
    import os
    import tarfile

    from igscale.io.shard_format import TarFormatError, iter_tar_samples, write_tar

    samples = [{"__key__": f"{i:09d}", "cls": b"7", "mean.npy": os.urandom(100 + 37 * i), "std.npy": b""}
               for i in range(6)]
    data = write_tar(samples)
    assert list(iter_tar_samples(io.BytesIO(data))) == samples
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert t.getnames() == [f"{s['__key__']}.{e}" for s in samples for e in ("cls", "mean.npy", "std.npy")]
    buf = io.BytesIO()
    long = "d" * 150 + "/000000001"
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ext, payload in (("cls", b"3"), ("mean.npy", b"abc")):
            info = tarfile.TarInfo(f"{long}.{ext}")
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    assert list(iter_tar_samples(io.BytesIO(buf.getvalue()))) == [{"__key__": long, "cls": b"3", "mean.npy": b"abc"}]
    bad = bytearray(data)
    bad[10] ^= 0xFF  # damage a header byte
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar_samples(io.BytesIO(bytes(bad))))
    with pytest.raises(TarFormatError, match="end of data"):
        list(iter_tar_samples(io.BytesIO(data[:700])))
