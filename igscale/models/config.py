"""ModelConfig: every architectural knob of the DiT/SiT and LightningDiT backbones with the IG heads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    name: str = "custom"
    """Registry name this config came from (informational)."""
    input_size: int = 32
    """Latent spatial size (32 for SD-VAE at 256 px, 16 for VA-VAE f16)."""
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    """Class count; the index num_classes is the null (CFG) label."""
    class_dropout_prob: float = 0.1
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    rope: bool = False
    qk_norm: bool = False
    ig_layers: tuple[int, ...] = (8,)
    """1-based block indices after which an IG head reads the tokens; the first one is the guidance head."""
    ig_head_init: Literal["zero", "xavier"] = "zero"
    """'zero' as the official SiT, 'xavier' as the official LightningDiT (adaLN and linear left xavier)."""
    time_convention: Literal["noise_at_1", "noise_at_0"] = "noise_at_1"
    """Convention the weights were trained in. igscale callers always pass t with noise at 1; a 'noise_at_0' model
    (official LightningDiT weights) is fed 1-t and its velocity is negated, so samplers never see the difference."""
    attn_backend: Literal["auto", "flash", "sdpa", "math"] = "auto"
    decoder_hidden_size: int | None = None
    """Official SiT argument; only accepted when equal to hidden_size (the official SiT-S crashes when it is not)."""

    def __post_init__(self):
        self.ig_layers = tuple(self.ig_layers)
        pos = {
            "input_size": self.input_size, "patch_size": self.patch_size, "in_channels": self.in_channels,
            "hidden_size": self.hidden_size, "depth": self.depth, "num_heads": self.num_heads,
            "num_classes": self.num_classes,
        }
        for k, v in pos.items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                f"head dim would be {self.hidden_size / self.num_heads:.2f}"
            )
        if self.decoder_hidden_size is not None and self.decoder_hidden_size != self.hidden_size:
            raise ValueError(
                f"decoder_hidden_size {self.decoder_hidden_size} does not match hidden_size {self.hidden_size}: "
                "the final and IG heads read the backbone tokens directly, so they must be equal "
                "(the official SiT-S/* variants crash on this mismatch)"
            )
        if not self.ig_layers:
            raise ValueError("ig_layers must name at least one block (the IG guidance head)")
        for layer in self.ig_layers:
            if not isinstance(layer, int) or not 1 <= layer <= self.depth:
                raise ValueError(
                    f"ig_layer {layer!r} is out of range: it is 1-based and must lie in [1, {self.depth}] "
                    f"for a model of depth {self.depth}"
                )
        if len(set(self.ig_layers)) != len(self.ig_layers):
            raise ValueError(f"ig_layers has duplicates: {self.ig_layers}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {self.class_dropout_prob}")
        if self.rope and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"rope needs a head dim divisible by 4, got {self.hidden_size // self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos embedding)")

    @property
    def ig_layer(self) -> int:
        return self.ig_layers[0]

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)
