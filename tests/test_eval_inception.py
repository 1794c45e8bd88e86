"""FID InceptionV3: the published pytorch-fid key layout loads (local and S3), outputs follow the ADM definitions."""
import numpy as np
import pytest
import torch

from igscale.demo.weights import random_published_state
from igscale.eval.inception import (
    WEIGHTS_FILENAME,
    WEIGHTS_URL,
    InceptionV3,
    load_inception,
    tf1_resize_bilinear,
)


def test_published_layout_keys_and_size():
    sd = InceptionV3().state_dict()
    params = {k: v for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    # torchvision's InceptionV3 has 27,161,264 params; minus AuxLogits (3,326,696), plus 8 extra classes (1008).
    assert sum(v.numel() for v in params.values()) == 23_850_960
    shapes = {  # a few entries of pt_inception-2015-12-05-6726825d.pth
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6d.branch7x7dbl_5.conv.weight": (192, 160, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for k, shp in shapes.items():
        assert tuple(sd[k].shape) == shp, k
    assert not any(k.startswith("AuxLogits") for k in sd)


def test_random_published_state_loads_and_runs(tmp_path):
    sd = random_published_state()
    torch.save(sd, tmp_path / WEIGHTS_FILENAME)
    model = load_inception(str(tmp_path), allow_unverified=True)  # a folder resolves to the published file name
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    cap = {}
    h = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: cap.setdefault("o", o))
    out = model(imgs)
    h.remove()
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008) and out["spatial"].shape == (2, 2023)
    assert torch.isfinite(out["pool"]).all() and out["pool"].std() > 0
    # IS logits exclude the bias (ADM multiplies pool3 by the weight only)
    torch.testing.assert_close(out["logits"], out["pool"] @ sd["fc.weight"].T)
    # spatial = Mixed_6d 1x1 branch, first 7 channels, NHWC flattening
    want = cap["o"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out["spatial"], want)
    assert cap["o"].shape[-2:] == (17, 17)


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_inception(str(tmp_path / "nope.pth"))
    assert WEIGHTS_FILENAME in str(e.value) and WEIGHTS_URL in str(e.value)
    sd = random_published_state()
    sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    del sd["Mixed_7c.branch_pool.conv.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not the pytorch-fid Inception layout"):
        load_inception(str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="NHWC"):
        InceptionV3()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_sha256_prefix_of_the_published_name_is_checked(tmp_path, monkeypatch):
    import hashlib

    from igscale.eval import inception

    torch.save(random_published_state(), tmp_path / WEIGHTS_FILENAME)
    digest = hashlib.sha256((tmp_path / WEIGHTS_FILENAME).read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="does not start with 6726825d.*--allow-unverified-weights"):
        load_inception(str(tmp_path))
    info = load_inception(str(tmp_path), allow_unverified=True).igscale_info
    assert info == {"url": str(tmp_path / WEIGHTS_FILENAME), "sha256": digest, "bytes": len(
        (tmp_path / WEIGHTS_FILENAME).read_bytes()), "expected_sha256_prefix": "6726825d", "verified": False}
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", digest[:8])  # as if this were the published file
    assert load_inception(str(tmp_path)).igscale_info["verified"] is True


def test_tf1_resize_grid():
    # TF1 legacy bilinear (no half-pixel centres): output i samples input at i * in/out.
    x = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2)
    y = tf1_resize_bilinear(x, 3)
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([0.0, 20 / 3, 10.0]))
    z = tf1_resize_bilinear(torch.arange(16.0).reshape(1, 1, 4, 4), 2)  # downsampling picks rows/cols 0 and 2
    torch.testing.assert_close(z[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))


@pytest.mark.slow
def test_load_from_s3(s3_bucket, tmp_path):
    from igscale.storage import open_storage

    torch.save(random_published_state(1), tmp_path / WEIGHTS_FILENAME)
    open_storage(f"s3://{s3_bucket}/weights").put_file(WEIGHTS_FILENAME, tmp_path / WEIGHTS_FILENAME)
    m = load_inception(f"s3://{s3_bucket}/weights/{WEIGHTS_FILENAME}", allow_unverified=True)
    assert m(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))["pool"].shape == (1, 2048)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME):
        load_inception(f"s3://{s3_bucket}/elsewhere/")
