"""A procedurally generated labelled image set in ImageNet folder layout (no download): the demo's dataset.

Four classes of shapes (disc, square, triangle, ring) of random sizes, in bright hues drawn independently of the
class (so only the shape tells the class), near the centre of smooth dark backgrounds, written as JPEGs under
`<root>/<class folder>/<name>.JPEG`. Deterministic for a given seed.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("c000_disc", "c001_square", "c002_triangle", "c003_ring")
# bright hues on dark backgrounds: a shape always stands out in luminance, whatever its colour
PALETTE = ((250, 90, 70), (90, 235, 110), (110, 150, 255), (250, 230, 80), (245, 140, 245), (240, 240, 240))


def _image(kind: int, rng: np.random.Generator, w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(15, 60, 3)
    grad = rng.uniform(-25, 25, (2, 3)) / max(w, h)  # a smooth dark gradient: the shape is the content
    bg = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + rng.normal(0, 4, (h, w, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.34) * min(w, h)
    cx, cy = np.array([w, h]) / 2 + rng.uniform(-0.12, 0.12, 2) * min(w, h)  # near the centre, which the crop keeps
    hue = np.array(PALETTE[rng.integers(len(PALETTE))]) + rng.integers(-20, 20, 3)  # colour says nothing of class
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
            img = _image(label, rng, w, h)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=92)
            yield f"{name}/{name}_{i:04d}.JPEG", label, buf.getvalue()


def _put_all(store, items: list) -> None:
    """Write (key, label, bytes) items with a few concurrent PUTs (object stores are latency-bound)."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda it: store.put_bytes(it[0], it[2]), items))


def toy_arrays(per_class: int = 24, size: int = 64, seed: int = 0, store=None) -> tuple[np.ndarray, np.ndarray]:
    """The toy set as the pipeline sees it (JPEG-decoded, ADM centre crop to `size`): uint8 (N, size, size, 3) and
    int64 labels (N,); also written as the JPEG tree through `store` (an igscale.storage Storage: local folder or
    s3:// prefix) if given. The demo's training and reference images."""
    from data_pipeline.crop import center_crop_adm

    items = list(toy_images(per_class, seed=seed))
    if store is not None:
        _put_all(store, items)
    imgs = [np.asarray(center_crop_adm(Image.open(io.BytesIO(data)).convert("RGB"), size)) for _, _, data in items]
    return np.stack(imgs), np.asarray([label for _, label, _ in items], dtype=np.int64)
