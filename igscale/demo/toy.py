"""A procedurally generated labelled image set in ImageNet folder layout (no download): the demo's dataset.

Four classes of coloured shapes (disc, square, triangle, ring) at random positions, sizes and hues on textured
backgrounds, written as JPEGs under `<root>/<class folder>/<name>.JPEG`. Deterministic for a given seed.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("c000_disc", "c001_square", "c002_triangle", "c003_ring")


def _image(kind: int, rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    base = rng.integers(20, 90, 3)
    bg = base + 25 * np.sin(xx[..., None] / rng.uniform(3, 9) + rng.uniform(0, 6, 3)) + rng.normal(0, 6, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r, 2)
    hue = np.array([[230, 60, 50], [60, 200, 80], [70, 110, 240], [240, 210, 60]][kind]) + rng.integers(-25, 25, 3)
    fill = tuple(int(v) for v in np.clip(hue, 0, 255))
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == 0:
        d.ellipse(box, fill=fill)
    elif kind == 1:
        d.rectangle(box, fill=fill)
    elif kind == 2:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    return img


def toy_images(per_class: int = 24, size: int = 80, seed: int = 0):
    """Yield (relative key, label, JPEG bytes); sizes vary around `size` so the ADM crop has work to do."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            w, h = int(size * rng.uniform(1.0, 1.4)), int(size * rng.uniform(1.0, 1.2))
            img = _image(label, rng, max(w, h)).crop((0, 0, w, h))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=92)
            yield f"{name}/{name}_{i:04d}.JPEG", label, buf.getvalue()


def write_toy_tree(store, per_class: int = 24, size: int = 80, seed: int = 0) -> int:
    """Write the toy set through an igscale.storage Storage (local folder or s3:// prefix). Returns the count."""
    n = 0
    for key, _, data in toy_images(per_class, size, seed):
        store.put_bytes(key, data)
        n += 1
    return n
