"""Ray precompute job end to end on a real local Ray cluster and a real S3 server (SeaweedFS)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.crop import center_crop_adm
from igscale.demo.weights import save_random_vae
from igscale.latents.format import decode_array, shard_key
from igscale.latents.loader import LatentLoader
from igscale.storage import StorageError, open_storage

CLASSES = ["n01443537", "n01530575", "n02085620"]
PER_CLASS = 8
RES = 32


def make_tree(store, *, corrupt: bool = True) -> list[tuple[str, int]]:
    """24 JPEGs of varied sizes in 3 class folders (+ one corrupt JPEG). Returns [(key, label)] of good images."""
    rng = np.random.default_rng(0)
    good = []
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            h, w = int(rng.integers(32, 90)), int(rng.integers(32, 90))
            yy, xx = np.mgrid[0:h, 0:w]
            arr = (np.stack([xx * 3, yy * 2, xx + yy], -1) + rng.integers(0, 60, (h, w, 3)) + 40 * c) % 256
            buf = io.BytesIO()
            Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
            store.put_bytes(f"{name}/img{i:03d}.JPEG", buf.getvalue())
            good.append((f"{name}/img{i:03d}.JPEG", c))
    if corrupt:
        store.put_bytes(f"{CLASSES[1]}/broken.JPEG", b"\xff\xd8\xff\xe0 not really a jpeg")
    return sorted(good)


def make_vae(store) -> None:
    """A tiny random SD-VAE-structured AutoencoderKL (f8, 4 latent channels) in the diffusers folder layout."""
    save_random_vae(store, "sd-vae", (32, 32, 32, 32), seed=123)


def job_args(bucket: str, out: str, **over) -> list[str]:
    args = {"input": f"s3://{bucket}/images", "output": f"s3://{bucket}/{out}", "vae-kind": "sd-vae",
            "vae-weights": f"s3://{bucket}/weights/vae", "resolution": RES, "samples-per-shard": 5,
            "batch-size": 4, "mode": "mean_std", "decode-threads": 2, **over}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def dataset_bucket(s3_server):
    bucket = s3_server.create_bucket()
    env = dict(s3_server.env)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        good = make_tree(open_storage(f"s3://{bucket}/images"))
        make_vae(open_storage(f"s3://{bucket}/weights/vae"))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return bucket, good


def test_ray_job_fault_roundtrip_rerun(ray_cluster, s3_server, dataset_bucket, tmp_path, monkeypatch):
    """`ray job submit` runs the job; a worker is SIGKILLed halfway through shard 2. Then: every shard exactly
    once with exact counts, the loader yields every image once across 2 ranks x 2 workers with the right label,
    stored latents equal a direct encode of the same crop, and a rerun after deleting a shard rewrites only it."""
    bucket, good = dataset_bucket
    for k, v in {**s3_server.env, **ray_cluster.env}.items():
        monkeypatch.setenv(k, v)
    marker = tmp_path / "killed.pid"
    runtime_env = {"env_vars": {**s3_server.env, "IGSCALE_FAULT_KILL_SHARD": "2",
                                "IGSCALE_FAULT_MARKER": str(marker), "OMP_NUM_THREADS": "1"}}
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit",
           "--address", ray_cluster.dashboard_url, "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "-m", "data_pipeline.run", *job_args(bucket, "latents")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert marker.exists(), "the fault hook never fired: the worker was not killed"
    summary = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith('{"manifest"')][-1])
    assert summary["written"] == [0, 1, 2, 3, 4] and summary["num_samples"] == 24 and summary["corrupt"] == 1

    out = open_storage(f"s3://{bucket}/latents")
    m = json.loads(out.get_text("manifest.json"))
    assert sorted(k for k in out.list("shards/") if k.endswith(".tar")) == [shard_key(i) for i in range(5)]
    assert [s["count"] for s in m["shards"]] == [5, 4, 5, 5, 5]  # the broken JPEG (index 8) is in shard 1
    assert m["num_samples"] == 24 and m["source"]["num_images"] == 25
    assert [c["path"] for c in m["corrupt"]] == [f"s3://{bucket}/images/{CLASSES[1]}/broken.JPEG"]
    assert m["latent"] == {"shape": [4, RES // 8, RES // 8], "dtype": "float32"}
    assert len(m["latent_stats"]["mean"]) == 4 and m["vae"]["weights_sha256"]

    # Stored latents == direct VAE encode of the same ADM crop.
    from igscale.vae import build_vae, encode

    vae = build_vae("sd-vae", f"s3://{bucket}/weights/vae")
    src = open_storage(f"s3://{bucket}/images")
    import webdataset as wds

    from igscale.latents.loader import register_s3_gopen

    register_s3_gopen()
    stored = {}
    for s in m["shards"]:
        for smp in wds.tarfile_to_samples()(iter([{"url": s["url"]}])):
            stored[int(smp["__key__"])] = smp
    all_keys = sorted([k for k, _ in good] + [f"{CLASSES[1]}/broken.JPEG"])
    key_of = {k: i for i, k in enumerate(all_keys)}
    pix = np.stack([np.asarray(center_crop_adm(Image.open(io.BytesIO(src.get_bytes(k))), RES)) for k, _ in good])
    mean, std = encode(vae, torch.from_numpy(pix))
    for j, (k, label) in enumerate(good):
        smp = stored[key_of[k]]
        assert int(smp["cls"]) == label
        torch.testing.assert_close(decode_array(smp["mean.npy"], "float32"), mean[j], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode_array(smp["std.npy"], "float32"), std[j], rtol=1e-5, atol=1e-5)
    # Dataset statistics in the manifest: over posterior samples, Var = Var(mean) + E[std^2].
    m64, s64 = mean.double().transpose(0, 1).reshape(4, -1), std.double().transpose(0, 1).reshape(4, -1)
    np.testing.assert_allclose(m["latent_stats"]["mean"], m64.mean(1).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m["latent_stats"]["std"], (m64.var(1, unbiased=False) + (s64**2).mean(1)).sqrt(),
                               rtol=1e-6)

    # Loader: 2 ranks x 2 workers, every image exactly once per epoch, right labels.
    label_of = {key_of[k]: c for k, c in good}
    for epoch in range(1):  # later epochs and resume: tests/test_loader.py
        seen = []
        for rank in range(2):
            ld = LatentLoader(f"s3://{bucket}/latents/manifest.json", batch_size=3, rank=rank, world_size=2,
                              num_workers=2, shuffle_buffer=6, return_keys=True, norm="scalar")
            ld.load_state_dict({**ld.state_dict(), "epoch": epoch})
            for b in ld:
                assert b["latent"].shape[1:] == (4, RES // 8, RES // 8)
                assert [label_of[k] for k in b["key"].tolist()] == b["label"].tolist()
                # latent = 0.18215 * (mean + std * eps), a fresh posterior sample
                eps = (b["latent"] / 0.18215 - torch.stack([decode_array(stored[k]["mean.npy"], "float32")
                                                            for k in b["key"].tolist()]))
                assert eps.abs().max() < 50 and eps.std() > 0.1
                seen += b["key"].tolist()
        assert sorted(seen) == sorted(label_of), f"epoch {epoch}: not every image exactly once"

    # Rerun after deleting shard 3: only shard 3 is written again (inline executor: same planning and checks).
    from data_pipeline.plan import PrecomputeConfig
    from data_pipeline.run import parse_args, precompute

    before = {k: out.client.head_object(Bucket=bucket, Key=f"latents/{k}")["LastModified"]
              for k in out.list("shards/")}
    out.delete(shard_key(3))
    cfg, _ = parse_args(job_args(bucket, "latents"))
    assert isinstance(cfg, PrecomputeConfig)
    res = precompute(cfg, executor="inline")
    assert res["written"] == [3] and res["skipped"] == [0, 1, 2, 4]
    after = {k: out.client.head_object(Bucket=bucket, Key=f"latents/{k}")["LastModified"] for k in out.list("shards/")}
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert changed == ["shards/shard-000003.json", "shards/shard-000003.tar"]
    m2 = json.loads(out.get_text("manifest.json"))
    assert [s["count"] for s in m2["shards"]] == [5, 4, 5, 5, 5] and m2["num_samples"] == 24
    assert [s["sha256"] for i, s in enumerate(m2["shards"]) if i != 3] == \
        [s["sha256"] for i, s in enumerate(m["shards"]) if i != 3]


def test_bad_input_fails_before_work(s3_server, dataset_bucket, monkeypatch, tmp_path):
    from data_pipeline.encode import CorruptImageError
    from data_pipeline.run import parse_args, precompute

    bucket, _ = dataset_bucket
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    cfg, _ = parse_args(job_args(bucket, "abort", **{"on-corrupt": "abort"}))
    with pytest.raises(CorruptImageError, match=f"s3://{bucket}/images/{CLASSES[1]}/broken.JPEG"):
        precompute(cfg, executor="inline")
    assert not open_storage(f"s3://{bucket}/abort").exists("manifest.json")
    cfg, _ = parse_args(job_args("no-such-bucket-q", "x", input=f"s3://{bucket}/images"))
    with pytest.raises(StorageError, match="does not exist"):
        precompute(cfg, executor="inline")
    torch.save({"state_dict": {"some.weight": torch.zeros(3)}}, tmp_path / "odd.pt")
    cfg, _ = parse_args(job_args(bucket, "odd", **{"vae-weights": str(tmp_path / "odd.pt")}))
    from igscale.vae import VAEError

    with pytest.raises(VAEError, match="unknown VAE layout"):
        precompute(cfg, executor="inline")
    assert open_storage(f"s3://{bucket}/odd").list() == []
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg, _ = parse_args(job_args(bucket, "x"))
    with pytest.raises(StorageError, match="no AWS credentials"):
        precompute(cfg, executor="inline")


def test_shuffled_shard_order(s3_server, dataset_bucket, monkeypatch):
    """shard_order="shuffled": shard k holds a fixed, seeded, class-mixed set of images (its run of a permutation
    of the sorted list); keys stay sorted-list indices, labels follow them, the manifest counts are exact, and a
    rerun with the same config skips every shard."""
    from data_pipeline.plan import shard_plan
    from data_pipeline.run import parse_args, precompute

    bucket, good = dataset_bucket
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    cfg, _ = parse_args(job_args(bucket, "shuffled", **{"shard-order": "shuffled", "seed": 3}))
    res = precompute(cfg, executor="inline")
    m = res["manifest"]
    assert res["written"] == [0, 1, 2, 3, 4] and m["shard_order"] == "shuffled"
    all_keys = sorted([k for k, _ in good] + [f"{CLASSES[1]}/broken.JPEG"])
    broken = all_keys.index(f"{CLASSES[1]}/broken.JPEG")
    label_of = {all_keys.index(k): c for k, c in good}
    plan = shard_plan(25, 5, "shuffled", 3)
    assert plan != shard_plan(25, 5) and sorted(i for ix in plan for i in ix) == list(range(25))
    import webdataset as wds

    from igscale.latents.loader import register_s3_gopen

    register_s3_gopen()
    mixed = 0
    for s, ix in zip(m["shards"], plan):
        smp = list(wds.tarfile_to_samples()(iter([{"url": s["url"]}])))
        assert [int(x["__key__"]) for x in smp] == [i for i in ix if i != broken]
        assert [int(x["cls"]) for x in smp] == [label_of[int(x["__key__"])] for x in smp]
        assert s["count"] == len(smp) and (s["first_index"], s["last_index"]) == (min(ix), max(ix))
        mixed += len({int(x["cls"]) for x in smp}) > 1
    assert mixed >= 4  # sorted order: at most 2 of the 5 shards cross a class boundary (8 images per class)
    assert m["num_samples"] == 24 and [c["index"] for c in m["corrupt"]] == [broken]
    again = precompute(cfg, executor="inline")
    assert again["written"] == [] and again["skipped"] == [0, 1, 2, 3, 4]
