"""The metric network: a small CNN trained on the real training split; its penultimate layer is the feature space.

It plays the role Inception plays for FID: FD, precision/recall are computed on its features, and its argmax gives the
class accuracy of conditional samples.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.ig_study.data import NUM_CLASSES


class DigitNet(nn.Module):
    def __init__(self, feature_dim: int = 32):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 8, 8)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
        )
        self.fc = nn.Linear(32 * 16, feature_dim)
        self.out = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) -> (B, feature_dim) penultimate activations."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))  # (B, 10) logits


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float, feature_dim: int, seed: int = 0
) -> DigitNet:
    """Adam on the real training split with small random shifts (±1 px) so features do not overfit pixel positions."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitNet(feature_dim)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb = x[idx]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def embed(net: DigitNet, x: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) float64, predicted class (N,)) of images (N, 1, 16, 16); inputs are clamped to [-1, 1]."""
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].float().clamp(-1, 1)
        f = net.features(xb)
        feats.append(f.double().numpy())
        preds.append(net.out(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)
