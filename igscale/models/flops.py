"""Analytic FLOP counts of IGDiT, for MFU estimates (training logs, benchmarks).

Convention (performance_anchors.md): DiT's "118.6 Gflops" for XL/2 are MACs; a forward pass costs 2 FLOP per MAC
(≈237 GFLOP per 256-px image) and training (forward + backward) 3× the forward (≈712 GFLOP per image).
"""
from __future__ import annotations

from igscale.models.config import ModelConfig

__all__ = ["forward_macs", "forward_flops_per_image", "train_flops_per_image"]


def forward_macs(cfg: ModelConfig, include_ig_heads: bool = True) -> int:
    """Multiply-accumulates of one forward pass for one image (matmuls and attention; elementwise ops ignored)."""
    D, T, p, C = cfg.hidden_size, cfg.num_tokens, cfg.patch_size, cfg.in_channels
    if cfg.mlp == "swiglu":
        h = int(2 / 3 * cfg.mlp_ratio * D)
        mlp = 3 * D * h
    else:
        mlp = 2 * D * int(cfg.mlp_ratio * D)
    per_token_block = 3 * D * D + D * D + mlp  # qkv, proj, mlp
    attn = 2 * T * T * D  # QKᵀ and AV
    blocks = cfg.depth * (T * per_token_block + attn)
    adaln = cfg.depth * 6 * D * D  # once per image, not per token
    embed = T * C * p * p * D + 256 * D + D * D
    head = T * D * p * p * C + 2 * D * D
    n_heads = 1 + (len(cfg.ig_layers) if include_ig_heads else 0)
    return blocks + adaln + embed + n_heads * head


def forward_flops_per_image(cfg: ModelConfig) -> float:
    return 2.0 * forward_macs(cfg)


def train_flops_per_image(cfg: ModelConfig) -> float:
    return 3.0 * forward_flops_per_image(cfg)
