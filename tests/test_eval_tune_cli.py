"""`igscale tune` end to end on CPU: successive halving over a 4-point grid, growing sample folders, resume."""
import json
import os

import numpy as np
import pytest

from igscale.cli import tune as cli_tune
from tests.test_eval_evaluate_sweep import assets  # noqa: F401  (the module-scoped fixture: export, Inception, ref)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_tune_halves_the_grid_reuses_samples_and_resumes(assets, tmp_path, capsys):  # noqa: F811
    d, weights = assets
    out = tmp_path / "tune"
    argv = ["--export", str(d / "export"), "--ref", str(d / "ref.npz"), "--inception", weights, "--out", str(out),
            "--allow-unverified-weights", "--num-samples", "8", "--start-samples", "4", "--chunk-size", "4",
            "--batch-size", "4", "--method", "euler", "--num-steps", "3", "--w-ig", "1.0", "1.5", "2.0", "3.0",
            "--w-cfg", "1.0"]
    assert cli_tune.main(argv) == 0
    res = json.loads((out / "tune.json").read_text())
    assert [len(r) for r in res["rungs"]] == [4, 2]
    assert res["samples_generated"] == 2 * 4 + 2 * 8 and res["grid_samples"] == 4 * 8
    finalists = res["rungs"][1]
    full = {p: res["scores"][p]["8"] for p in finalists}
    assert res["best"]["point"] == min(full, key=full.get)
    # the finalists' 4-sample scores are those of the first rung, and their folders grew to 8 samples in place
    for p in finalists:
        assert set(res["scores"][p]) == {"4", "8"}
        with np.load(out / p / "samples.npz") as z:
            assert z["arr_0"].shape[0] == 8
        assert sorted(os.listdir(out / p / "chunks")) == ["chunk_000000.json", "chunk_000000.npz",
                                                          "chunk_000001.json", "chunk_000001.npz"]
    # the 4-sample rung picked the two lowest FIDs
    first = sorted(res["scores"], key=lambda p: res["scores"][p]["4"])
    assert sorted(finalists) == sorted(first[:2])
    assert "Chosen:" in (out / "tune.md").read_text()
    # a rerun re-reads every stored score and generates nothing
    stamps = {p: os.path.getmtime(out / p / "metrics_000000004.json") for p in res["scores"]}
    capsys.readouterr()
    assert cli_tune.main(argv) == 0
    assert "chunk" not in capsys.readouterr().out
    assert stamps == {p: os.path.getmtime(out / p / "metrics_000000004.json") for p in res["scores"]}
    assert json.loads((out / "tune.json").read_text())["best"] == res["best"]


def test_tune_refuses_balanced_labels_and_bad_fractions(capsys):
    base = ["--export", "e", "--ref", "r.npz", "--inception", "w.pth", "--out", "o"]
    assert cli_tune.main([*base, "--labels", "balanced"]) == 2
    assert "needs --labels random" in capsys.readouterr().err
    assert cli_tune.main([*base, "--keep", "1"]) == 2
    assert "--keep must lie in (0, 1)" in capsys.readouterr().err
    assert cli_tune.main([*base, "--start-samples", "0"]) == 2
    assert "--start-samples" in capsys.readouterr().err
