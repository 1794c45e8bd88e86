"""How stored raw VAE latents map to what the diffusion model sees: part of the latent dataset's schema (the
manifest records the VAE kind and, for per-channel recipes, the dataset's latent statistics)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["SD_SCALE", "LatentNorm"]

# SD-VAE's latent scaling factor, the SiT/DiT recipe.
SD_SCALE = 0.18215


@dataclass
class LatentNorm:
    """raw VAE latent z <-> model latent: (z - shift) * scale, with per-channel or scalar shift/scale."""

    shift: torch.Tensor  # (C,) or ()
    scale: torch.Tensor  # (C,) or ()

    @classmethod
    def scalar(cls, scale: float = SD_SCALE) -> LatentNorm:
        return cls(torch.tensor(0.0), torch.tensor(float(scale)))

    @classmethod
    def per_channel(cls, mean: Any, std: Any, multiplier: float = 1.0) -> LatentNorm:
        std = torch.as_tensor(std, dtype=torch.float32)
        if torch.any(std <= 0):
            raise ValueError("per-channel latent std must be positive")
        return cls(torch.as_tensor(mean, dtype=torch.float32), multiplier / std)

    @classmethod
    def from_manifest(cls, manifest: dict, recipe: Literal["auto", "scalar", "per_channel"] = "auto") -> LatentNorm:
        """auto: SD-VAE -> scalar 0.18215 (SiT recipe); otherwise per-channel stats of the dataset (LightningDiT)."""
        if recipe == "auto":
            recipe = "scalar" if manifest["vae"]["kind"] == "sd-vae" else "per_channel"
        if recipe == "scalar":
            return cls.scalar(float(manifest["vae"].get("scaling_factor", SD_SCALE)))
        return cls.per_channel(manifest["latent_stats"]["mean"], manifest["latent_stats"]["std"])

    def _b(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        t = t.to(device=z.device, dtype=z.dtype)
        return t.view(-1, 1, 1)  # (C,1,1) or (1,1,1): a sized operand, so bf16 z promotes to float32

    def normalize(self, z: torch.Tensor) -> torch.Tensor:  # (..., C, H, W)
        return (z - self._b(self.shift, z)) * self._b(self.scale, z)

    def normalize_(self, z: torch.Tensor) -> torch.Tensor:
        """In-place normalize (loader hot path)."""
        return z.sub_(self._b(self.shift, z)).mul_(self._b(self.scale, z))

    def normalize_from(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """normalize(z) written into `out` (any float z dtype; out's dtype), two passes (loader hot path)."""
        torch.sub(z, self._b(self.shift, out), out=out)
        return out.mul_(self._b(self.scale, out))

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self._b(self.scale, z) + self._b(self.shift, z)
