"""Building blocks shared by the DiT/SiT and LightningDiT backbones.

Shape legend: B batch, T tokens, D hidden size, H heads, Dh head dim, C latent channels, p patch size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from igscale.ops.attention import attention
from igscale.ops.linear import Linear, linear

__all__ = ["modulate", "sincos_1d", "sincos_2d", "Rope2D", "rotate_half", "apply_rope", "PatchEmbed",
           "TimestepEmbedder", "LabelEmbedder", "RMSNorm", "make_norm", "Mlp", "SwiGLU", "Attention", "Block",
           "OutputHead"]


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x·(1+scale)+shift; x (B, T, D), shift/scale (B, D)."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# Position embeddings


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE 1-D sin-cos table: (N,) positions -> (N, dim) as [sin | cos] over dim/2 frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    ang = pos.double().reshape(-1, 1) * omega  # (N, dim/2)
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Frozen 2-D sin-cos table (grid*grid, dim), row-major tokens.

    MAE quirk kept for weight compatibility: the first half of the channels encodes the column (w) coordinate and the
    second half the row (h) coordinate, because MAE's meshgrid puts w first.
    """
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    rows = torch.arange(grid).repeat_interleave(grid)  # h index of token i*grid+j
    cols = torch.arange(grid).repeat(grid)  # w index
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


class Rope2D(nn.Module):
    """2-D axial rotary embedding (EVA-02 style) over a grid x grid token layout.

    Frequencies 1/10000^(2k/(Dh/2)), each repeated for an adjacent pair of dims; the row angles fill the first Dh/2
    head dims and the column angles the last Dh/2. Tables are recomputed, not stored (they are not learned).
    """

    def __init__(self, head_dim: int, grid: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dim divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = 1.0 / 10000 ** (torch.arange(0, half, 2, dtype=torch.float64) / half)  # (half/2,)
        pos = torch.arange(grid, dtype=torch.float64)
        ang = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (grid, half)
        ang_h = ang[:, None, :].expand(grid, grid, half)
        ang_w = ang[None, :, :].expand(grid, grid, half)
        ang2d = torch.cat([ang_h, ang_w], dim=-1).reshape(grid * grid, head_dim)  # (T, Dh)
        self.register_buffer("cos", ang2d.cos().float(), persistent=False)
        self.register_buffer("sin", ang2d.sin().float(), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos, self.sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs (a, b) -> (-b, a)."""
    x = x.unflatten(-1, (-1, 2))  # (..., Dh/2, 2)
    a, b = x.unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos/sin (T, Dh)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Embedders


class PatchEmbed(nn.Module):
    """Patchify, (B, C, H, W) -> (B, T, D): a conv with kernel = stride = p, computed as the GEMM it is.

    The weight stays a Conv2d (official key layout); running it as a linear over flattened patches gives the same
    result and lets `batch_invariant()` cover it (a conv's kernel choice depends on the batch size).
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.p = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.p
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        patches = patches.reshape(B, (H // p) * (W // p), C * p * p)  # (B, T, C·p²), row-major tokens
        return linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)  # (B, T, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (unscaled, as the official SiT/LightningDiT) -> [cos | sin] features -> MLP -> (B, D)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size))

    @staticmethod
    def features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = self.features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(f)


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index num_classes) for the null / CFG token."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is None and self.training and self.dropout_prob > 0:
            drop_mask = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        if drop_mask is not None:
            y = torch.where(drop_mask, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# ----------------------------------------------------------------------------------------------------------------
# Norms and MLPs


class RMSNorm(nn.Module):
    """x·rsqrt(mean(x²)+eps) computed in fp32, cast back, times a learnable weight (init 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (the DiT/SiT MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """w12 -> split -> silu(x1)·x2 -> w3, hidden width int(2/3·mlp_ratio·D) (3072 for XL)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = Linear(dim, 2 * hidden)
        self.w3 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


# ----------------------------------------------------------------------------------------------------------------
# Attention, block, output head


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, norm: str, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = Linear(dim, 3 * dim, bias=True)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim) if norm == "rmsnorm" else nn.LayerNorm(self.head_dim, eps=1e-6)
            self.k_norm = RMSNorm(self.head_dim) if norm == "rmsnorm" else nn.LayerNorm(self.head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = attention(q, k, v, backend=self.backend)  # (B, H, T, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """adaLN-Zero transformer block: x += gate·f(modulate(norm(x))) for attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm: str, mlp: str, qk_norm: bool, backend: str):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qk_norm, norm, backend)
        self.norm2 = make_norm(norm, dim)
        if mlp == "swiglu":
            self.mlp = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim))
        else:
            self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        # x (B, T, D), c (B, D); chunk order as the official code: shift/scale/gate for msa, then for mlp
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        x = x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))
        return x


class OutputHead(nn.Module):
    """norm -> adaLN shift/scale -> Linear(D, p²·C). Used for the final layer and for every IG head."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, norm: str):
        super().__init__()
        self.norm_final = make_norm(norm, dim)
        self.linear = Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p²·C)
