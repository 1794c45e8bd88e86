"""Guidance sweep: a grid of (w_ig, w_cfg, CFG interval, IG interval) sampled with shared seeds and scored.

Every grid point reuses the same per-sample seeds and labels, so differences between points come from the
guidance settings alone. Points are generated one after another by all ranks (chunked and resumable like
`igscale sample`), scored by the distributed evaluator, and summarised on rank 0 as sweep.md / sweep.csv /
sweep.json plus a PNG plot of FID (and IS) against w_ig, one line per (w_cfg, intervals).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass, replace

from igscale.core.typed import to_dict
from igscale.diffusion.guidance import GuidanceConfig
from igscale.storage import open_storage

__all__ = ["GridPoint", "make_grid", "write_report"]

COLUMNS = ("point", "w_ig", "w_cfg", "cfg_interval", "ig_interval", "fid", "sfid", "inception_score", "precision",
           "recall", "num_samples")


@dataclass(frozen=True)
class GridPoint:
    index: int
    guidance: GuidanceConfig

    @property
    def name(self) -> str:
        return f"point_{self.index:03d}"

    def row(self) -> dict:
        g = self.guidance
        return {"point": self.name, "w_ig": g.w_ig, "w_cfg": g.w_cfg, "cfg_interval": f"{g.cfg_interval[0]:g}-"
                f"{g.cfg_interval[1]:g}", "ig_interval": f"{g.ig_interval[0]:g}-{g.ig_interval[1]:g}"}


def make_grid(base: GuidanceConfig, w_ig, w_cfg, cfg_intervals, ig_intervals) -> list[GridPoint]:
    """Cartesian product; empty axes keep the base value. CFG intervals are dropped where w_cfg == 1 (no-op)."""
    pts, seen = [], set()
    for wi, wc, ci, ii in itertools.product(w_ig or [base.w_ig], w_cfg or [base.w_cfg],
                                            cfg_intervals or [base.cfg_interval], ig_intervals or [base.ig_interval]):
        g = replace(base, w_ig=float(wi), w_cfg=float(wc), cfg_interval=tuple(ci) if wc != 1 else (0.0, 1.0),
                    ig_interval=tuple(ii) if wi != 1 else (0.0, 1.0))
        g.__post_init__()
        key = json.dumps(to_dict(g), sort_keys=True)
        if key not in seen:
            seen.add(key)
            pts.append(GridPoint(len(pts), g))
    return pts


def write_report(out_url: str, rows: list[dict], meta: dict) -> None:
    """sweep.md, sweep.csv, sweep.json and (for scored rows) sweep.png under `out_url`."""
    store = open_storage(out_url)
    scored = all("fid" in r for r in rows)
    columns = COLUMNS if scored else (*COLUMNS[:5], "samples")
    fmt = {"fid": "{:.3f}", "sfid": "{:.3f}", "inception_score": "{:.2f}", "precision": "{:.3f}", "recall": "{:.3f}"}
    best = min(rows, key=lambda r: r["fid"]) if scored else None
    md = [f"# Guidance sweep ({meta.get('num_samples')} samples per point, {meta.get('label_protocol')} labels, "
          f"shared seeds from {meta.get('seed')})", "", f"Sampler: `{json.dumps(meta.get('sampler'))}`", "",
          "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [fmt[c].format(r[c]) if c in fmt else str(r[c]) for c in columns]
        if r is best:
            cells = [f"**{c}**" for c in cells]
        md.append("| " + " | ".join(cells) + " |")
    store.put_text("sweep.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    store.put_text("sweep.csv", buf.getvalue())
    store.put_text("sweep.json", json.dumps({"meta": meta, "rows": rows}, indent=2, sort_keys=True))
    if scored:
        store.put_bytes("sweep.png", _plot(rows))


def _plot(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"w_cfg={r['w_cfg']:g} cfg[{r['cfg_interval']}] ig[{r['ig_interval']}]", []).append(r)
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["w_ig"])
        for ax, key in zip(axes, ("fid", "inception_score")):
            ax.plot([r["w_ig"] for r in rs], [r[key] for r in rs], marker="o", label=label)
    for ax, key in zip(axes, ("FID (lower is better)", "Inception Score")):
        ax.set_xlabel("w_ig")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
