"""Successive halving for guidance tuning: rung schedule, survivor selection and cost accounting, by hand."""
import math

import pytest

from igscale.eval.tune import format_report, grid_cost, rungs, successive_halving


def test_rungs_double_up_to_the_full_count():
    assert rungs(1000, 8000) == [1000, 2000, 4000, 8000]
    assert rungs(3000, 10000) == [3000, 6000, 10000]
    assert rungs(5000, 5000) == [5000]
    with pytest.raises(ValueError, match="start_samples"):
        rungs(0, 10)
    with pytest.raises(ValueError, match="start_samples"):
        rungs(20, 10)


def test_sixteen_candidates_cost_five_full_sets_and_keep_the_best():
    true = [3.0 + 0.1 * ((7 * i) % 16) for i in range(16)]  # candidate 0 is best (3.0), then 9 (3.1)...
    calls = []

    def score(i, cand, n):
        calls.append((i, n))
        return cand + 400.0 / n  # the small-N bias is shared by every candidate, so it cancels in the ranking

    res = successive_halving(true, score, start=1000, full=8000, log=lambda s: None)
    assert res.best == 0
    assert [len(m) for m in res.rung_members] == [16, 8, 4, 2]
    # each candidate generates only its largest set (smaller ones are its prefixes): 8 stop at 1k, 4 at 2k,
    # 2 at 4k and the 2 finalists reach 8k
    assert res.samples_generated == 8 * 1000 + 4 * 2000 + 2 * 4000 + 2 * 8000  # = 40k = 5 full sets
    assert res.samples_generated / grid_cost(16, 8000) == pytest.approx(40000 / 128000)
    assert res.samples_scored == 16 * 1000 + 8 * 2000 + 4 * 4000 + 2 * 8000
    assert len(calls) == 30 and (0, 8000) in calls
    report = format_report(res, [f"p{i}" for i in range(16)], 8000)
    assert "**p0**" in report and "31% of the full grid" in report


def test_a_nan_candidate_ranks_last_and_keep_rounds_up():
    cands = [float("nan"), 2.0, 1.0]
    res = successive_halving(cands, lambda i, c, n: c, start=10, full=20, keep=0.5, log=lambda s: None)
    assert res.rung_members == [[0, 1, 2], [1, 2]] and res.best == 2  # ceil(3 * 0.5) = 2 survivors
    assert math.isnan(res.scores[0][10])
    with pytest.raises(ValueError, match="keep"):
        successive_halving(cands, lambda i, c, n: c, start=10, full=20, keep=1.0)
