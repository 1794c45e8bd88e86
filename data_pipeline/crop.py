"""The ADM (guided-diffusion) centre crop used for ImageNet latents and for the FID reference batches.

1. Halve with a BOX filter while the short side is >= 2*size (cheap, alias-free downscaling).
2. BICUBIC resize so the short side is exactly `size` (the long side is rounded).
3. Centre crop to size x size (offsets floor((dim - size) / 2)).
"""
from __future__ import annotations

from PIL import Image

__all__ = ["center_crop_adm"]


def center_crop_adm(pil_image: Image.Image, size: int) -> Image.Image:
    """Returns a size x size RGB image. Accepts any PIL mode (converted to RGB first)."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    img = pil_image.convert("RGB") if pil_image.mode != "RGB" else pil_image
    if min(img.size) < 1:
        raise ValueError(f"empty image of size {img.size}")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(d // 2 for d in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(d * scale) for d in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))
