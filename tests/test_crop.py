"""ADM centre crop vs an independent implementation written here (numpy box filter + torch antialiased bicubic)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.crop import center_crop_adm


def _box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) box filter: output pixel i is the plain mean of the input pixels whose centres lie in its
    footprint (i*s, (i+1)*s], s = n_in / n_out (PIL's convention for the boundary pixel)."""
    s = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        inside = [j for j in range(n_in) if i * s < j + 0.5 <= (i + 1) * s and j < int((i + 1) * s + 0.5)]
        m[i, inside] = 1.0 / len(inside)
    return m


def reference_adm(arr: np.ndarray, size: int) -> np.ndarray:
    x = arr.astype(np.float64)  # (H, W, 3)
    while min(x.shape[:2]) >= 2 * size:
        h, w = x.shape[:2]
        # Separable: width pass, round to 8 bits (halves up), height pass, round.
        x = np.floor(np.einsum("pw,hwc->hpc", _box_matrix(w, w // 2), x) + 0.5)
        x = np.floor(np.einsum("oh,hpc->opc", _box_matrix(h, h // 2), x) + 0.5)
    h, w = x.shape[:2]
    scale = size / min(h, w)
    nh, nw = round(h * scale), round(w * scale)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    y = np.floor(t[0].permute(1, 2, 0).numpy() + 0.5).clip(0, 255)
    top, left = (nh - size) // 2, (nw - size) // 2
    return y[top:top + size, left:left + size]


@pytest.mark.parametrize("hw,size", [((300, 517), 64), ((129, 129), 64), ((64, 48), 64), ((1001, 257), 32),
                                     ((512, 512), 256), ((40, 90), 32)])
def test_crop_matches_reference(hw, size):
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    h, w = hw
    # Smooth structure + noise: a wrong offset or scale shows up far above the filter-rounding tolerance.
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None] * np.array([1.0, -0.6, 0.3])
    arr = np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    out = np.asarray(center_crop_adm(Image.fromarray(arr), size)).astype(np.float64)
    ref = reference_adm(arr, size)
    assert out.shape == (size, size, 3)
    diff = np.abs(out - ref)
    # Fixed-point filter rounding differs slightly (most at borders when upsampling); a 1-pixel shift or a
    # wrong scale gives a mean error > 5 on this image.
    assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))


def test_crop_modes_and_errors():
    gray = Image.fromarray(np.full((70, 50), 200, np.uint8), mode="L")
    out = center_crop_adm(gray, 32)
    assert out.mode == "RGB" and out.size == (32, 32)
    assert np.all(np.asarray(out) == 200)
    with pytest.raises(ValueError):
        center_crop_adm(gray, 0)
