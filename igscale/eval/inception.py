"""InceptionV3 feature extractor for FID/sFID/IS, matching the TensorFlow graph that the ADM evaluator uses.

The parameter layout is that of the published pytorch-fid port of the 2015-12-05 TF Inception graph
(`pt_inception-2015-12-05-6726825d.pth`, also used by torch-fidelity), so that file loads with strict key
checking. Differences from torchvision's InceptionV3 (all required to reproduce the TF graph):
- average pools inside the Inception blocks exclude padding (count_include_pad=False);
- the last block (Mixed_7c) uses a max pool in its pool branch;
- 1008 output classes, and IS uses the logits without the bias (ADM multiplies pool3 by the weight only);
- input: uint8 NHWC, resized to 299x299 with TF1's legacy bilinear resize (no half-pixel centres),
  then (x - 128) / 128.
Outputs: pool3 (N, 2048), logits (N, 1008), spatial (N, 2023) = the first 7 channels of the Mixed_6d 1x1 branch
("mixed_6/conv" in the TF graph), 17x17, flattened in NHWC order as ADM does.
"""
from __future__ import annotations

import hashlib
import io
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["InceptionV3", "load_inception", "WEIGHTS_FILENAME", "WEIGHTS_URL", "WEIGHTS_SHA256_PREFIX",
           "tf1_resize_bilinear"]

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# The published name ends in the first 8 hex digits of the file's sha256 (torch hub's check_hash convention).
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME


class _Conv(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; keys `conv.*`, `bn.*` as in the published file."""

    def __init__(self, cin: int, cout: int, k, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):  # Mixed_5b/c/d, 35x35
    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_ch, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # Mixed_6b..6e, 17x17, factorized 7x7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward_with_1x1(self, x):
        b1 = self.branch1x1(x)  # (B, 192, 17, 17); TF name mixed_<i>/conv
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([b1, b7, d, self.branch_pool(_avg3(x))], 1), b1

    def forward(self, x):
        return self.forward_with_1x1(x)[0]


class _BlockD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):  # Mixed_7b/7c, 8x8
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        a = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), a, d, self.branch_pool(p)], 1)


def _tf1_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    # TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False): src = dst * n_in / n_out.
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp_(max=n_in - 1)
    hi = (lo + 1).clamp_(max=n_in - 1)
    frac = (src - lo).float()
    m = torch.zeros(n_out, n_in)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) with TF1's legacy bilinear sampling grid."""
    _, _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    mh = _tf1_resize_matrix(h, size).to(x)  # (size, H)
    mw = _tf1_resize_matrix(w, size).to(x)  # (size, W)
    return torch.einsum("oh,bchw,pw->bcop", mh, x, mw)


class InceptionV3(nn.Module):
    """FID InceptionV3. forward(uint8 NHWC images) -> dict(pool=(B,2048), logits=(B,1008), spatial=(B,2023))."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 NHWC images with 3 channels, got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W) in [0, 255]
        x = (tf1_resize_bilinear(x, 299) - 128.0) / 128.0  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        x, conv6 = self.Mixed_6d.forward_with_1x1(x)  # conv6: (B, 192, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048)
        spatial = conv6[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)  # (B, 17*17*7) NHWC order
        logits = pool @ self.fc.weight.T  # (B, 1008), no bias: ADM's softmax graph
        return {"pool": pool, "logits": logits, "spatial": spatial}


def _missing_weights_error(url: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Inception weights not found at {url!r}. Expected the pytorch-fid FID Inception file {WEIGHTS_FILENAME} "
        f"(published at {WEIGHTS_URL}); download it once, place it there (or on S3) and pass --inception <path-or-url>. "
        "igscale never downloads weights itself."
    )


def _read_weights(url: str) -> tuple[bytes, str]:
    """(file bytes, the URL or path actually read: a folder resolves to the published file name in it)."""
    if url.startswith("s3://"):
        from igscale.storage import split_url

        if url.endswith("/"):
            url += WEIGHTS_FILENAME
        store, name = split_url(url)
        try:
            return store.get_bytes(name), url
        except FileNotFoundError as e:
            raise _missing_weights_error(url) from e
    path = url[len("file://"):] if url.startswith("file://") else url
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_FILENAME)
    if not os.path.isfile(path):
        raise _missing_weights_error(path)
    with open(path, "rb") as f:
        return f.read(), path


def load_inception(url: str, device: torch.device | str = "cpu", *, allow_unverified: bool = False) -> InceptionV3:
    """Build InceptionV3 and load the published FID weights from a local path/dir or an s3:// URL (strict keys).

    The file's sha256 must start with WEIGHTS_SHA256_PREFIX, as for the published file: other weights in the same
    layout (a re-conversion, a random file) give other numbers under the same name. allow_unverified: load them
    anyway. The returned module carries `igscale_info` = {url, sha256, bytes, expected_sha256_prefix, verified}.
    """
    data, where = _read_weights(url)
    digest = hashlib.sha256(data).hexdigest()
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{url}: expected a state dict in the pytorch-fid layout, got {type(state).__name__}")
    model = InceptionV3()
    expected = model.state_dict()
    # The published file predates BatchNorm's num_batches_tracked buffers; they are irrelevant in eval mode.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise ValueError(
            f"{url}: not the pytorch-fid Inception layout ({WEIGHTS_FILENAME}); "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{url}: wrong tensor shapes for {bad[:5]}")
    verified = digest.startswith(WEIGHTS_SHA256_PREFIX)
    if not verified and not allow_unverified:
        raise ValueError(
            f"{where}: sha256 {digest[:16]}... does not start with {WEIGHTS_SHA256_PREFIX}, so these are not the "
            f"published {WEIGHTS_FILENAME} and their FIDs are not comparable to published ones; pass "
            "--allow-unverified-weights to score with them anyway (recorded as unverified)")
    model.load_state_dict(state, strict=False)
    model.igscale_info = {"url": where, "sha256": digest, "bytes": len(data),
                          "expected_sha256_prefix": WEIGHTS_SHA256_PREFIX, "verified": verified}
    return model.eval().to(device)
