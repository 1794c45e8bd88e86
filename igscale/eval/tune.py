"""Guidance tuning by successive halving: a grid's best point at a fraction of the grid's samples.

Every candidate is scored on the first n_0 samples of the shared seed sequence; the best `keep` fraction survive and
are scored again on twice as many samples (the first half of which they already have: sample i depends only on its
seed, so a point's n-sample set extends its smaller ones), until the survivors are scored at the full count.

Why a small-N ranking can be trusted here. FID estimated from N samples is biased upward, by roughly tr-terms of
order D/N (the covariance estimate's noise), so FID at 5k reads higher than at 50k. But every candidate is scored on
the same seeds and labels, so (a) the bias is nearly the same for all candidates, which cancels in a ranking, and
(b) most of the sampling noise is shared too, so the difference between two candidates has far less variance than
either FID. Candidates whose FIDs differ by less than the remaining noise may swap; keeping a fraction, rather than
the single best, gives them another look at the next rung. docs/evaluation.md measures this on the IG study's model.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["rungs", "TuneResult", "successive_halving", "grid_cost", "format_report"]

C = TypeVar("C")


def rungs(start: int, full: int, growth: int = 2) -> list[int]:
    """Sample counts start, start·g, ... up to and ending at full."""
    if not 1 <= start <= full:
        raise ValueError(f"need 1 <= start_samples <= num_samples, got {start} and {full}")
    if growth < 2:
        raise ValueError(f"growth must be >= 2, got {growth}")
    out = [start]
    while out[-1] < full:
        out.append(min(out[-1] * growth, full))
    return out


@dataclass
class TuneResult(Generic[C]):
    best: int
    """Index of the chosen candidate."""
    scores: dict[int, dict[int, float]] = field(default_factory=dict)
    """candidate index -> {sample count: FID}."""
    rung_members: list[list[int]] = field(default_factory=list)
    """Candidates scored at each rung."""
    samples_generated: int = 0
    """Sum over candidates of the largest sample count each was scored at (smaller sets are prefixes of it)."""
    samples_scored: int = 0
    """Sum over every (candidate, rung) of its sample count: the feature-extraction work."""


def successive_halving(candidates: Sequence[C], score: Callable[[int, C, int], float], *, start: int, full: int,
                       keep: float = 0.5, growth: int = 2, log: Callable[[str], None] = print) -> TuneResult[C]:
    """score(index, candidate, n) -> FID of the candidate on its first n samples (lower is better)."""
    if not candidates:
        raise ValueError("no candidates to tune")
    if not 0.0 < keep < 1.0:
        raise ValueError(f"keep must lie in (0, 1), got {keep}")
    res: TuneResult[C] = TuneResult(best=0)
    alive = list(range(len(candidates)))
    counts = rungs(start, full, growth)
    for r, n in enumerate(counts):
        res.rung_members.append(list(alive))
        for i in alive:
            res.scores.setdefault(i, {})[n] = float(score(i, candidates[i], n))
        ranked = sorted(alive, key=lambda i: (_key(res.scores[i][n]), i))
        log(f"tune rung {r}: {len(alive)} candidate(s) at {n} samples; best {ranked[0]} "
            f"(FID {res.scores[ranked[0]][n]:.4f})")
        if n == counts[-1]:
            res.best = ranked[0]
            break
        alive = sorted(ranked[:max(1, math.ceil(len(ranked) * keep))])
    res.samples_generated = sum(max(s) for s in res.scores.values())
    res.samples_scored = sum(sum(s) for s in res.scores.values())
    return res


def _key(fid: float) -> float:
    return fid if math.isfinite(fid) else math.inf  # a NaN FID (a broken candidate) ranks last


def grid_cost(num_candidates: int, full: int) -> int:
    """Samples a full grid at the full count generates (and scores)."""
    return num_candidates * full


def format_report(res: TuneResult, names: Sequence[str], full: int) -> str:
    """Markdown: the choice, every candidate's FID by sample count, and the cost against the full grid."""
    counts = sorted({n for s in res.scores.values() for n in s})
    grid = grid_cost(len(names), full)
    lines = [f"Chosen: **{names[res.best]}** (FID {res.scores[res.best][full]:.4f} at {full} samples)", "",
             "| candidate | " + " | ".join(f"FID @ {n}" for n in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for i, name in enumerate(names):
        cells = [f"{res.scores[i][n]:.4f}" if n in res.scores.get(i, {}) else "" for n in counts]
        lines.append(f"| {'**' + name + '**' if i == res.best else name} | " + " | ".join(cells) + " |")
    lines += ["", f"Samples generated: {res.samples_generated} ({res.samples_generated / grid:.0%} of the full grid's "
              f"{grid}); samples scored: {res.samples_scored} ({res.samples_scored / grid:.0%})."]
    return "\n".join(lines) + "\n"
