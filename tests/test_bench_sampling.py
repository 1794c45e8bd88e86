"""CPU smoke run of bench_sampling.compare_modes (the sampling-mode comparison the GPU device check runs in full)."""
import math

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_modes_tiny_cpu():
    from bench.bench_sampling import compare_modes

    r = compare_modes("SiT-S/2", "cpu", 3, steps=1, repeats=1, tiny=True, peak_tflops=1.0)
    assert set(r["modes"]) == {"default", "batch_invariant", "plain"}
    assert r["default_mode"] == "plain" and r["modes"]["default"]["batch_invariant"] is False
    assert r["vae"]["kind"] == "sd-vae"  # tiny random SD-VAE built, so the decode is timed too
    for name in ("default/plain", "invariant/plain", "sampling default/plain", "sampling invariant/plain",
                 "vae default/plain", "vae invariant/plain"):
        v = r["ratios"][name]
        assert math.isfinite(v) and v > 0, (name, v)
    for m in r["modes"].values():
        for k in ("img_nfe_per_s", "vae_img_per_s", "img_per_s", "forward_tflops", "mfu"):
            assert math.isfinite(m[k]) and m[k] > 0, (k, m[k])
    assert r["forward_gflop_per_image"] > 0 and isinstance(r["default_meets_0.9x"], bool)


def test_compare_modes_without_vae():
    from bench.bench_sampling import compare_modes

    r = compare_modes("SiT-S/2", "cpu", 2, steps=1, repeats=1, tiny=True, vae=False)
    assert "skipped" in r["vae"] and "vae default/plain" not in r["ratios"]
    assert r["modes"]["plain"]["mfu"] is None and r["ratios"]["invariant/plain"] > 0
