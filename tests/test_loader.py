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
    assert len(full) == 2 * 8  # 24 samples a epoch: 8 batches of 3
    for k in range(len(full)):  # every cut: mid-window, at window ends, the short last window, the epoch boundary
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
    ld = mk(on_corrupt="skip")
    got = [b["key"].tolist() for b in itertools.islice(ld, 2)]
    fresh = mk(on_corrupt="skip")
    fresh.load_state_dict(ld.state_dict())
    got += [b["key"].tolist() for b in fresh]
    assert sum(got, []) == keys  # the same skips on resume: the same stream


# ---------------------------------------------------------------------------------------------- shard reader
def _shard(n: int, dtype: str = "float32", first: int = 0, seed: int = 0) -> tuple[bytes, list[dict]]:
    from igscale.latents.format import encode_array, sample_key, write_tar

    g = torch.Generator().manual_seed(seed)
    samples = [{"__key__": sample_key(first + i), "cls": str((i * 389) % 1000).encode(),  # 1 to 3 digits
                "mean.npy": encode_array(torch.randn(4, 4, 4, generator=g), dtype),
                "std.npy": encode_array(torch.rand(4, 4, 4, generator=g), dtype)} for i in range(n)]
    return write_tar(samples), samples


def _read(data: bytes) -> tuple[list[int], list[int], list]:
    import io

    from igscale.latents.loader import read_shard

    keys, labels, arrays = [], [], []
    for k, y, (m, s) in read_shard(io.BufferedReader(io.BytesIO(data)), ("mean", "std")):
        keys += k.tolist()
        labels += y.tolist()
        arrays += [(a.copy(), b.copy()) for a, b in zip(m, s)]
    return keys, labels, arrays


def _tarfile(data: bytes) -> tuple[list[int], list[int], list]:
    """The reference: Python's tarfile, members grouped by key."""
    import io
    import tarfile

    from igscale.latents.format import npy_view

    groups: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            key, _, ext = m.name.rpartition("/")[2].partition(".")
            groups.setdefault(key, {})[ext] = t.extractfile(m).read()
    return ([int(k) for k in groups], [int(g["cls"]) for g in groups.values()],
            [(npy_view(g["mean.npy"]), npy_view(g["std.npy"])) for g in groups.values()])


def _same(got, want) -> bool:
    return got[:2] == want[:2] and len(got[2]) == len(want[2]) and all(
        np.array_equal(a, b) for x, y in zip(got[2], want[2]) for a, b in zip(x, y))


def test_reader_equals_tarfile_for_every_read_size(monkeypatch):
    """The reader yields exactly what tarfile reads, for both stored dtypes and the ways a read can cut a record
    (the first read anywhere past the first record, later reads of whole records, the archive's end)."""
    from igscale.latents import loader

    for dtype in ("float32", "bfloat16"):
        data, _ = _shard(40, dtype)
        rec = next(r for r in range(512, len(data), 512) if data[r:r + 9] == b"000000001")
        want = _tarfile(data)
        for chunk in (rec + 512, rec + 513, 2 * rec - 1, 2 * rec, 3 * rec + 17, len(data) - 1, len(data), 1 << 20):
            monkeypatch.setattr(loader, "_CHUNK", chunk)
            assert _same(_read(data), want), (dtype, chunk)


def test_reader_damaged_and_foreign_shards():
    """Damage to any header field a tar reader relies on, a cut anywhere (even in the end blocks), or another
    writer's layout (an extra member, pax headers, not a tar) is a TarFormatError, never a wrong or missing sample."""
    import io
    import tarfile

    from igscale.latents.format import TarFormatError, write_tar

    data, samples = _shard(12)
    samples2 = [dict(s) for s in samples]
    samples2[5]["json"] = b'{"note": 1}'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for s in samples[:3]:
            for ext in ("cls", "mean.npy", "std.npy"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.pax_headers = len(s[ext]), {"comment": "x" * 20}
                t.addfile(info, io.BytesIO(s[ext]))
    rec = next(r for r in range(512, len(data), 512) if data[r:r + 9] == samples[1]["__key__"].encode())
    bad = []
    for at in (0, 7):  # the first record (the layout's template) and one in the middle
        for where in (130, 3, 124, 1024 + 3):  # .cls header: mtime, a key digit, the size; mean.npy's key digit
            b = bytearray(data)
            b[at * rec + where] = (b[at * rec + where] - 48 + 1) % 8 + 48
            bad.append(bytes(b))
    cuts = [data[:cut] for cut in (len(data) // 2, len(data) // 2 + 700, 10 * rec + 512, 10 * rec, len(data) - 10000)]
    for d in [write_tar(samples2), buf.getvalue(), b"this is not a tar file" * 100, *bad, *cuts]:
        with pytest.raises(TarFormatError):
            _read(d)
    b = bytearray(data)
    b[7 * rec + 512] ^= 1  # a label digit is payload: read as is, as tarfile reads it
    assert _read(bytes(b))[1] == _tarfile(bytes(b))[1] != _tarfile(data)[1]


def test_read_time_draws_are_per_sample_from_the_posterior_stream():
    """Noise seeds and flips: Stream.POSTERIOR (epoch, key) per sample, so they do not depend on the batch."""
    from igscale.core.seeding import Stream, seed_of
    from igscale.latents.loader import _draws, finish_stored
    from igscale.latents.norm import LatentNorm

    keys = np.array([0, 1, 2, 10**9, 2**40 + 3], np.int64)
    seeds, flips = _draws(7, 3, keys)
    assert seeds.tolist() == [seed_of(7, Stream.POSTERIOR, 3, int(k)) for k in keys]
    assert flips.tolist() == [s % 2 == 1 for s in seeds.tolist()]
    stored = torch.rand(5, 2, 4, 3, 3)
    whole = finish_stored(stored, seeds, LatentNorm.scalar())
    assert all(torch.equal(whole[i], finish_stored(stored[i:i + 1], seeds[i:i + 1], LatentNorm.scalar())[0])
               for i in range(5))
    assert not torch.equal(whole, finish_stored(stored, _draws(7, 4, keys)[0], LatentNorm.scalar()))


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
    mk = lambda **kw: LatentLoader(f"s3://{bucket}/ms/manifest.json", **{
        "batch_size": 4, "rank": 0, "world_size": 1, "num_workers": 2, "shuffle_buffer": 5, "return_keys": True,
        "worker_type": worker_type, **kw})
    on_workers = list(_epochs(mk(), 2))
    if worker_type == "process":  # the same stream as thread workers
        threads = list(_epochs(mk(worker_type="thread"), 2))
        assert all(torch.equal(a["key"], b["key"]) and torch.equal(a["latent"], b["latent"])
                   for a, b in zip(on_workers, threads, strict=True))
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


@pytest.mark.parametrize("finish_on", ["workers", "device"])
def test_window_buffers_come_back_only_once_no_batch_holds_them(moments_dataset, finish_on):
    """Windows reuse their buffers (a fresh one costs page zeroing) once every batch viewing them is dropped, and
    never while one is held: batches kept for 3 epochs equal copies taken as they came."""
    bucket, _, _ = moments_dataset
    mk = lambda: LatentLoader(f"s3://{bucket}/ms/manifest.json", batch_size=2, rank=0, world_size=1, num_workers=2,
                              shuffle_buffer=4, finish_on=finish_on)
    field = "stored" if finish_on == "device" else "latent"
    ld = mk()
    copies = [b[field].clone() for b in _epochs(ld, 3)]  # each batch dropped at once
    assert len(ld._pool) == 2  # the window being filled and the one before it: nothing else was needed
    held = list(_epochs(mk(), 3))
    assert len(held) == len(copies) == 3 * 17 and all(torch.equal(h[field], c) for h, c in zip(held, copies))


def test_closing_the_epoch_iterator_stops_the_workers(moments_dataset):
    """The trainer closes the epoch iterator mid-epoch: the worker threads end there, not at exit."""
    import threading

    bucket, _, _ = moments_dataset
    ld = LatentLoader(f"s3://{bucket}/ms/manifest.json", batch_size=2, rank=0, world_size=1, num_workers=2,
                      shuffle_buffer=2)
    it = iter(ld)
    next(it)
    assert any(t.name.startswith("latent-loader") for t in threading.enumerate())
    it.close()
    assert not any(t.name.startswith("latent-loader") for t in threading.enumerate())


@pytest.mark.parametrize("finish_on", ["workers", "device"])
def test_exit_with_an_abandoned_epoch_iterator_is_clean(moments_dataset, s3_server, finish_on):
    """A process that exits with an epoch half read (iterator never closed) exits at once with status 0: no hang on
    worker threads, and no thread inside a torch op while the interpreter finalises ("terminate called ...")."""
    import os
    import subprocess
    import sys

    bucket, _, _ = moments_dataset
    code = (f"from igscale.latents.loader import LatentLoader\n"
            f"ld = LatentLoader('s3://{bucket}/ms/manifest.json', batch_size=2, rank=0, world_size=1, num_workers=2, "
            f"shuffle_buffer=2, finish_on='{finish_on}')\n"
            f"it = iter(ld)\nnext(it)\nprint('ok', flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, **s3_server.env}, capture_output=True,
                       text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and p.stdout.strip() == "ok" and "terminate" not in p.stderr, p.stderr[-2000:]


def test_fewer_shards_than_ranks_is_refused(tmp_path):
    """A rank without a shard would wait for data forever; the loader says so at construction instead."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"num_samples": 4, "mode": "mean_std", "shards": [{"key": "s0.tar", "count": 4}],
                                    "latent": {"shape": [4, 2, 2], "dtype": "float32"}}))
    with pytest.raises(ValueError, match="1 shard\\(s\\) for 2 ranks: use a smaller --samples-per-shard"):
        LatentLoader(str(manifest), batch_size=2, rank=0, world_size=2)
