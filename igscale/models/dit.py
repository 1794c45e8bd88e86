"""IGDiT: one backbone for DiT/SiT (LayerNorm, GELU MLP) and LightningDiT (RMSNorm, SwiGLU, RoPE, qk-norm), with
Internal Guidance heads after intermediate blocks. Single-device torch code; guidance lives in igscale.diffusion.

Shape legend: B batch, C latent channels, H=W latent size, p patch, T=(H/p)² tokens, D hidden size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from igscale.models.config import ModelConfig
from igscale.models.layers import Block, LabelEmbedder, OutputHead, PatchEmbed, Rope2D, TimestepEmbedder, sincos_2d

__all__ = ["IGDiT"]


class IGDiT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Frozen parameter (not a buffer) so that parameter counts and state-dict keys match the official models.
        self.pos_embed = nn.Parameter(sincos_2d(D, cfg.grid).unsqueeze(0), requires_grad=False)  # (1, T, D)
        self.rope = Rope2D(D // cfg.num_heads, cfg.grid) if cfg.rope else None
        # Blocks are built one by one (not deep-copied) so deepspeed.zero.Init can partition them.
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm, cfg.mlp, cfg.qk_norm, cfg.attn_backend)
            for _ in range(cfg.depth)
        )
        self.final_layer = OutputHead(D, cfg.patch_size, cfg.in_channels, cfg.norm)
        self.ig_heads = nn.ModuleList(OutputHead(D, cfg.patch_size, cfg.in_channels, cfg.norm) for _ in cfg.ig_layers)
        self._head_at = {layer: i for i, layer in enumerate(cfg.ig_layers)}
        self.activation_checkpointing = False
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        heads = [self.final_layer] + (list(self.ig_heads) if self.config.ig_head_init == "zero" else [])
        for head in heads:
            for lin in (head.adaLN_modulation[-1], head.linear):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (per-block checkpointing)."""
        self.activation_checkpointing = enabled

    # ------------------------------------------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p²·C) -> (B, C, H, W)."""
        p, C, g = self.config.patch_size, self.config.in_channels, self.config.grid
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        want = self.config.latent_shape
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"{self.config.name}: expected latents of shape (B, {want[0]}, {want[1]}, {want[2]}), "
                f"got {tuple(x.shape)}"
            )
        B = x.shape[0]
        if t.shape != (B,) or y.shape != (B,):
            raise ValueError(f"t and y must have shape ({B},), got {tuple(t.shape)} and {tuple(y.shape)}")

    def forward_heads(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One pass: (D_f, [D_i for each IG layer]), all (B, C, H, W), in igscale's convention (noise at t=1)."""
        self._check_inputs(x, t, y)
        flip = self.config.time_convention == "noise_at_0"
        t_in = 1.0 - t if flip else t
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, T, D)
        c = self.t_embedder(t_in) + self.y_embedder(y, drop_mask)  # (B, D)
        rope = self.rope() if self.rope is not None else None
        inter: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks, start=1):
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(blk, h, c, rope, use_reentrant=False)
            else:
                h = blk(h, c, rope)  # (B, T, D)
            if i in self._head_at:
                inter.append(self.unpatchify(self.ig_heads[self._head_at[i]](h, c)))
        out = self.unpatchify(self.final_layer(h, c))  # (B, C, H, W)
        if flip:  # a noise-at-0 model predicts data - noise; igscale's velocity is noise - data
            out, inter = -out, [-d for d in inter]
        return out, inter

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor | None = None):
        """(D_f, D_i) where D_i is the guidance head (first entry of ig_layers)."""
        out, inter = self.forward_heads(x, t, y, drop_mask)
        return out, inter[0]

    def num_params(self, include_ig_heads: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_ig_heads:
            n -= sum(p.numel() for p in self.ig_heads.parameters())
        return n
