"""bench/bench_gpu.py's CPU smoke run: every row is built from a RunConfig, agrees with the reference, and the
igscale rows ran `igscale train`'s compiled blocks and optimizers (a subprocess, as a user would run it)."""
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("SiT-XL/2", "LightningDiT-XL/1")


def test_bench_gpu_cpu_smoke(tmp_path):
    out = tmp_path / "b.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "bench/bench_gpu.py", "--device", "cpu", "--tiny", "--batches", "4",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    info = json.loads(out.read_text())
    assert info["agreement_ok"] and info["complete"] and info["tiny"]
    assert "max_batch" not in info  # the search is CUDA only
    rows = {(r["model"], r["batch"], r["variant"], r["zero_stage"]): r for r in info["rows"]}
    assert len(rows) == len(info["rows"]) == 6
    for model in MODELS:
        ref = rows[(model, 4, "reference", None)]
        assert ref["compile"] == "none" and ref["optimizer"] == "AdamW(foreach=False)" and ref["agreement"] is None
        assert ref["attn_backend"] == "sdpa" and ref["ratio_vs_reference"] == 1.0
        for zero in (2, 0):
            r = rows[(model, 4, "igscale", zero)]
            a = r["agreement"]
            assert a["ok"] and a["loss_rel"] < 1e-2 and a["grad_rel"] < 1e-2, a
            assert r["compile"] == "blocks" and r["compile_backend"] == "aot_eager" and r["compiled_graphs"] > 0
            assert r["device_skip"]
            assert math.isfinite(r["ratio_vs_reference"]) and r["ratio_vs_reference"] > 0
        for r in (rows[(model, 4, v, z)] for v, z in (("reference", None), ("igscale", 2), ("igscale", 0))):
            assert math.isfinite(r["img_s"]) and r["img_s"] > 0 and math.isfinite(r["mfu"]) and r["mfu"] > 0
            assert math.isnan(r["mem_gib"])  # CPU: no device memory figure
    # the configs' optimizers: fused AdamW for SiT; Muon for LightningDiT (replicated at ZeRO-0, partitioned at 2)
    assert rows[("SiT-XL/2", 4, "igscale", 2)]["optimizer"] == rows[("SiT-XL/2", 4, "igscale", 0)]["optimizer"] \
        == "AdamW(fused)"
    assert rows[("LightningDiT-XL/1", 4, "igscale", 0)]["optimizer"] == "MuonWithAdam"
    assert rows[("LightningDiT-XL/1", 4, "igscale", 2)]["optimizer"] == "ZeroMuonWithAdam"
    assert rows[("SiT-XL/2", 4, "igscale", 2)]["precision"] == "bf16"
    assert "scaling" in rows[("SiT-XL/2", 4, "igscale", 2)]
    for model in MODELS:
        s = info["sampling"][model]
        modes = s.get("modes", {"forward": s})
        assert all(v["img_nfe_per_s"] > 0 for v in modes.values())
    assert "vae_encode" in info and info["cpu_decode_crop"]["img_per_s_per_core"] > 0
    assert "igscale z2" in p.stdout and "MuonWithAdam" in p.stdout  # the printed table names each row's optimizer
