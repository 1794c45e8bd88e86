"""LatentLoader against shards on the real S3 test server: exact epochs, split by rank and worker, exact resume,
read-time sampling and normalisation, corrupt/truncated shards."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from data_pipeline.run import parse_args, precompute
from igscale.latents.format import decode_array
from igscale.latents.loader import LatentLoader, assign_shards, epoch_shard_order
from igscale.storage import open_storage
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

    from igscale.latents.loader import register_s3_gopen

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

    from igscale.latents.format import TarFormatError, iter_tar_samples, write_tar

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


# ---------------------------------------------------------------------------------------------- block reader
def _shard(n: int, dtype: str = "float32", first: int = 0, seed: int = 0) -> tuple[bytes, list[dict]]:
    from igscale.latents.format import encode_array, sample_key, write_tar

    g = torch.Generator().manual_seed(seed)
    samples = [{"__key__": sample_key(first + i), "cls": str((i * 389) % 1000).encode(),  # 1 to 3 digits
                "mean.npy": encode_array(torch.randn(4, 4, 4, generator=g), dtype),
                "std.npy": encode_array(torch.rand(4, 4, 4, generator=g), dtype)} for i in range(n)]
    return write_tar(samples), samples


def _blocks(data: bytes, chunk: int) -> tuple[list[int], list[int], list]:
    import io

    from igscale.latents.reader import read_sample_blocks

    keys, labels, arrays = [], [], []
    for b in read_sample_blocks(io.BytesIO(data), ("mean", "std"), chunk_bytes=chunk):
        keys += b.keys.tolist()
        labels += b.labels.tolist()
        arrays += [(m.copy(), s.copy()) for m, s in zip(*b.arrays)]
    return keys, labels, arrays


def test_block_reader_equals_member_parser():
    """The vectorised reader yields exactly what the member-by-member parser yields, for every way a chunk can
    cut a record, and for both stored dtypes."""
    import io

    from igscale.latents.format import iter_tar_samples, npy_view

    for dtype in ("float32", "bfloat16"):
        data, _ = _shard(40, dtype)
        ref = list(iter_tar_samples(io.BytesIO(data)))
        want = ([int(s["__key__"]) for s in ref], [int(s["cls"]) for s in ref],
                [(npy_view(s["mean.npy"]), npy_view(s["std.npy"])) for s in ref])
        for chunk in (1000, 4095, 4096, 4097, 3 * 4096 + 17, len(data) - 1, 1 << 20):
            keys, labels, arrays = _blocks(data, chunk)
            assert keys == want[0] and labels == want[1], (dtype, chunk)
            assert all(np.array_equal(a, b) for x, y in zip(arrays, want[2]) for a, b in zip(x, y)), chunk


def test_block_reader_irregular_and_damaged_shards():
    """An irregular record mid-shard hands over to the member parser (same samples); damage anywhere in a
    header, a key digit, a label or the stream's length is an error, never a silently wrong sample."""
    import io
    import tarfile

    from igscale.latents.format import TarFormatError, iter_tar_samples

    data, samples = _shard(12)
    # an extra member in sample 5 (another writer's layout): still every sample, from the member parser
    samples2 = [dict(s) for s in samples]
    samples2[5]["json"] = b'{"note": 1}'
    from igscale.latents.format import write_tar

    data2 = write_tar(samples2)
    assert _blocks(data2, 1 << 20)[0] == [int(s["__key__"]) for s in samples]
    # pax headers (long names) from the start: member parser throughout
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for s in samples[:3]:
            for ext in ("cls", "mean.npy", "std.npy"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.pax_headers = len(s[ext]), {"comment": "x" * 20}
                t.addfile(info, io.BytesIO(s[ext]))
    assert _blocks(buf.getvalue(), 1 << 20)[1] == [int(s["cls"]) for s in samples[:3]]
    rec = next(r for r in range(512, len(data), 512) if data[r:r + 9] == samples[1]["__key__"].encode())
    for where, what in ((7 * rec + 130, "mtime"), (7 * rec + 3, "key digit"), (7 * rec + 148, "checksum"),
                        (7 * rec + 512, "label digit")):
        bad = bytearray(data)
        bad[where] = (bad[where] + 1 - 48) % 10 + 48 if what != "mtime" else bad[where] ^ 0x01
        if what == "label digit":  # keep the checksum valid: the label is payload, so check it is read as is
            keys, labels, _ = _blocks(bytes(bad), 1 << 20)
            assert labels == [int(s["cls"]) for s in iter_tar_samples(io.BytesIO(bytes(bad)))]
            assert labels[7] != int(samples[7]["cls"])
            continue
        with pytest.raises(TarFormatError, match="checksum"):
            _blocks(bytes(bad), 1 << 20)
    for cut in (len(data) // 2, len(data) // 2 + 700, 10 * rec + 512):
        with pytest.raises(TarFormatError):
            _blocks(data[:cut], 1 << 20)
    # cut at a record boundary the tar itself is well-formed: 10 samples (the loader's count check rejects it)
    assert len(_blocks(data[:10 * rec], 1 << 20)[0]) == 10


def test_mix_many_matches_scalar_mix():
    from igscale.latents.loader import _mix, _mix_many

    keys = np.array([0, 1, 2, 10**9, 2**40 + 3], np.int64)
    assert _mix_many(7, 3, keys).tolist() == [_mix(7, 3, int(k)) for k in keys]


# ---------------------------------------------------------------------------------------------- mean_std paths
@pytest.fixture(scope="module")
def moments_dataset(s3_server):
    """5 synthetic shards (7,7,7,7,5 samples) of posterior mean/std, float32, on the S3 test server."""
    import hashlib

    from igscale.latents.format import FORMAT, shard_key

    bucket = s3_server.create_bucket()
    mp = pytest.MonkeyPatch()
    for k, v in s3_server.env.items():
        mp.setenv(k, v)
    try:
        store = open_storage(f"s3://{bucket}/ms")
        recs, means, stds = [], {}, {}
        for k, n in enumerate((7, 7, 7, 7, 5)):
            data, samples = _shard(n, first=7 * k, seed=k)
            store.put_bytes(shard_key(k), data)
            for s in samples:
                means[int(s["__key__"])] = decode_array(s["mean.npy"], "float32")
                stds[int(s["__key__"])] = decode_array(s["std.npy"], "float32")
            recs.append({"key": shard_key(k), "url": store.url(shard_key(k)), "count": n, "size": len(data),
                         "sha256": hashlib.sha256(data).hexdigest(), "first_index": 7 * k, "last_index": 7 * k + n - 1})
        store.put_text("manifest.json", json.dumps({
            "format": FORMAT, "num_samples": 33, "mode": "mean_std", "fields": ["mean", "std"],
            "latent": {"shape": [4, 4, 4], "dtype": "float32"}, "vae": {"kind": "sd-vae", "scaling_factor": 0.5},
            "latent_stats": {"mean": [0.0] * 4, "std": [1.0] * 4}, "shards": recs}))
        yield bucket, means, stds
    finally:
        mp.undo()


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_finish_on_device_equals_workers_and_resumes(moments_dataset, worker_type):
    """finish_on="device": batches carry the stored moments and a noise seed; LatentLoader.to_device draws
    the same posterior sample the workers draw (bitwise on CPU), tails included, and resume is exact."""
    bucket, means, stds = moments_dataset
    mk = lambda **kw: LatentLoader(f"s3://{bucket}/ms/manifest.json", batch_size=4, rank=0, world_size=1,
                                   num_workers=2, shuffle_buffer=5, return_keys=True, worker_type=worker_type, **kw)
    on_workers = list(_epochs(mk(), 2))
    dev = mk(finish_on="device")
    on_device = list(_epochs(dev, 2))
    assert len(on_device) == len(on_workers) == 2 * 9
    eps = []
    for a, b in zip(on_workers, on_device):
        assert torch.equal(a["key"], b["key"])
        assert torch.equal(a["latent"], dev.to_device(b, "cpu")["latent"])
        for z, k in zip(a["latent"], a["key"].tolist()):  # latent = 0.5 * (mean + std * eps)
            eps.append((z / 0.5 - means[k]) / stds[k])
    eps = torch.cat([e.flatten() for e in eps])
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1  # 2 epochs x 33 samples x 64 values
    # a fresh epoch draws fresh noise for the same sample
    first = {k: z for b in on_workers[:9] for z, k in zip(b["latent"], b["key"].tolist())}
    second = {k: z for b in on_workers[9:] for z, k in zip(b["latent"], b["key"].tolist())}
    assert all(not torch.equal(first[k], second[k]) for k in first)
    for k in (2, 9, 11):  # mid-epoch, at the epoch boundary, in the next epoch's tail
        ld = mk(finish_on="device")
        got = list(itertools.islice(_epochs(ld, 2), k))
        fresh = mk(finish_on="device")
        fresh.load_state_dict(json.loads(json.dumps(ld.state_dict())))
        got += list(_epochs(fresh, 2))
        assert [g["key"].tolist() for g in got] == [b["key"].tolist() for b in on_device]
        assert all(torch.equal(dev.to_device(g, "cpu")["latent"], a["latent"]) for g, a in zip(got, on_workers))


def test_finish_on_device_sample_flip(flip_dataset):
    """LightningDiT layout: the workers hand over the stored bf16 pairs and their flip choices; to_device
    picks and normalises them into the workers' float32 result exactly."""
    bucket, _ = flip_dataset
    on_workers = list(_loader(bucket, norm="per_channel"))
    dev = _loader(bucket, norm="per_channel", finish_on="device")
    on_device = list(dev)
    assert len(on_device) == len(on_workers)
    for a, b in zip(on_workers, on_device):
        if "stored" in b:
            assert b["stored"].dtype == torch.bfloat16 and b["stored"].shape[2:] == a["latent"].shape[1:]
            assert b["flip"].dtype == torch.bool and 0 < sum(int(x["flip"].sum()) for x in on_device if "flip" in x)
        assert torch.equal(a["latent"], dev.to_device(b, "cpu")["latent"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recycler_reuses_a_buffer_once_every_view_is_dropped(dtype):
    from igscale.latents.loader import _Recycler

    r = _Recycler((6, 2, 3), dtype, enabled=True)
    a = r.get(4)
    ptr = a.data_ptr()
    b = r.get(5)  # `a` is still held: a second buffer
    assert b.data_ptr() != ptr and r.allocated == 2
    c = a[1:]  # a view of a view keeps the buffer busy
    del a
    assert r.get(3).data_ptr() not in (ptr, b.data_ptr()) and r.allocated == 3
    del c
    assert r.get(6).data_ptr() == ptr and r.allocated == 3  # dropped by everyone: reused, nothing new


def test_thread_loader_reuses_its_buffers_across_epochs(moments_dataset):
    """Many small windows over 4 epochs: the staging and output buffers in use at once are bounded by the
    prefetch depth, so the pools stop allocating (a fresh buffer per window costs page faults)."""
    bucket, _, _ = moments_dataset
    for finish_on, pool in (("workers", "latent"), ("device", "stage")):
        ld = LatentLoader(f"s3://{bucket}/ms/manifest.json", batch_size=2, rank=0, world_size=1, num_workers=2,
                          shuffle_buffer=2, finish_on=finish_on)
        n = sum(1 for _ in _epochs(ld, 4))
        assert n == 4 * 17
        made = sum(r.allocated for (w, kind), r in ld._pools.items() if kind == pool)
        assert 2 <= made <= 24, (finish_on, made)  # ~64 windows and 64 chunks were made
