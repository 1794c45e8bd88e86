"""bench/device_check.sh in its CPU smoke mode: every stage of the GPU device check runs here on tiny models
(CUDA tests collected and skipped, random latents with the project's writer, `igscale train` with compiled blocks
plus one resume, `igscale sample` with a preset and a random-weight SD-VAE, bench_gpu.py), so it cannot rot."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE_CHECK_SMOKE="1", OUT=str(out), WORK=str(tmp_path / "work"), PYTHON=sys.executable,
               DEADLINE_S="420", OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "device_check.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=480)
    log = (out / "check.log").read_text() if (out / "check.log").exists() else p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] and set(s["stages"]) == {"cuda_tests", "latents", "train", "resume", "vae", "sample", "bench"}
    assert all(v["rc"] == 0 for v in s["stages"].values()), s["stages"]
    assert s["resume_line"] and "at step 6" in s["resume_line"][0]
    assert sorted(map(int, s["train_after_resume"])) == list(range(1, 9))
    assert "compile=blocks (aot_eager)" in log and "skips non-finite steps on the device" in log
    assert json.loads((out / "samples.json").read_text())["num_samples"] == 16
    assert json.loads((out / "bench_gpu.json").read_text())["rows"]
