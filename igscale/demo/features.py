"""The demo's metric network: a small CNN trained on the toy classes, playing the role Inception plays for FID.

A random-weight Inception gives numbers that only exercise the code. This network is trained on the real training
images, so its penultimate features separate discs, squares, triangles and rings: the Fréchet distance and
precision/recall on them (igscale's own metric code) and the accuracy with which a sample is classified as its
conditioning label say something at the demo's scale. The reference is a held-out split of real images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from igscale.eval.fid import compute_stats, frechet_distance
from igscale.eval.metrics import precision_recall
from igscale.vae import to_model_pixels

__all__ = ["ShapeNet", "train_shape_net", "embed", "score_samples"]


class ShapeNet(nn.Module):
    def __init__(self, num_classes: int = 4, feature_dim: int = 32):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 32, 32)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 16, 16)
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),  # (B, 32, 4, 4)
        )
        self.fc = nn.Linear(32 * 16, feature_dim)
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [-1, 1] -> (B, feature_dim)
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))  # (B, num_classes) logits


def train_shape_net(images: np.ndarray, labels: np.ndarray, *, epochs: int = 6, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0) -> ShapeNet:
    """Adam on uint8 NHWC images with random flips and ±2 px shifts, so features track shape, not position."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = to_model_pixels(np.ascontiguousarray(images), "cpu", torch.float32), torch.as_tensor(labels, dtype=torch.long)
    net = ShapeNet(int(y.max()) + 1).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            if bool(torch.rand((), generator=g) < 0.5):
                xb = xb.flip(3)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            loss = F.cross_entropy(net(torch.roll(xb, (dy, dx), (2, 3))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def embed(net: ShapeNet, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) float64, predicted class (N,)) of uint8 NHWC images."""
    feats, preds = [], []
    for i in range(0, len(images), 256):
        x = to_model_pixels(np.ascontiguousarray(images[i:i + 256]), "cpu", torch.float32)
        f = net.features(x)
        feats.append(f.double().numpy())
        preds.append(net.out(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def score_samples(net: ShapeNet, ref_images: np.ndarray, images: np.ndarray, labels: np.ndarray,
                  k: int = 3) -> dict[str, float]:
    """Fréchet distance and precision/recall (k-NN radii) of uint8 NHWC `images` against `ref_images` on the
    network's features, and the share of images the network classifies as their conditioning label."""
    ref, _ = embed(net, ref_images)
    feats, pred = embed(net, images)
    s, r = compute_stats(feats), compute_stats(ref)
    prec, rec = precision_recall(ref, feats, k=k)
    return {"fd": frechet_distance(s.mu, s.sigma, r.mu, r.sigma), "precision": prec, "recall": rec,
            "accuracy": float(np.mean(pred == np.asarray(labels)))}
