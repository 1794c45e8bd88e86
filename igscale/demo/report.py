"""The demo's outputs for a person: the labelled sample grid (PNG) and the printed summary."""
from __future__ import annotations

import numpy as np

__all__ = ["pick_columns", "write_grid", "metric_table"]


def pick_columns(labels: np.ndarray, num_classes: int, per_class: int = 2) -> np.ndarray:
    """Indices of the first `per_class` items of every class, class by class: the grid's columns."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)])


def write_grid(rows: list[tuple[str, np.ndarray]], column_names: list[str], out, scale: int = 2) -> None:
    """rows: (row label, uint8 (C, H, W, 3) images); one column per image, `column_names` above them."""
    from PIL import Image, ImageDraw

    s = rows[0][1].shape[1]
    label_w, head_h = 96, 14
    canvas = Image.new("RGB", (label_w + len(column_names) * s, head_h + len(rows) * s), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(column_names):
        draw.text((label_w + c * s + 2, 1), name, fill="black")
    for r, (name, imgs) in enumerate(rows):
        draw.text((4, head_h + r * s + s // 2 - 5), name, fill="black")
        for c, img in enumerate(imgs):
            canvas.paste(Image.fromarray(np.ascontiguousarray(img)), (label_w + c * s, head_h + r * s))
    canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST).save(out)


def metric_table(rows: dict[str, dict[str, float]], keys: tuple[str, ...], fmt: str = "{:>11.4f}") -> list[str]:
    """Lines of a fixed-width table: one row per setting, one column per key."""
    lines = [f"{'setting':<10}" + "".join(f"{k:>11}" for k in keys)]
    for name, m in rows.items():
        lines.append(f"{name:<10}" + "".join(fmt.format(m.get(k, float("nan"))) for k in keys))
    return lines
