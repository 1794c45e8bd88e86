"""`igscale train` refuses to resume into a different experiment, and to train on more classes than the model has
(issue 14, items 7 and 12). A plain single-process run (one-rank group) on a local random latent set."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.device_latents import write_random_latents

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(tmp_path, manifest, *extra):
    cmd = [sys.executable, "-m", "igscale.cli.main", "train", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
           f"run_dir={tmp_path / 'run'}", f"data.manifest_url={manifest}", f"checkpoint.url={tmp_path / 'ck'}",
           "train.global_batch=8", "checkpoint.every_steps=2", "sample.every_steps=0", "data.num_workers=0", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_resume_with_a_changed_model_is_refused_unless_allowed(tmp_path):
    manifest = write_random_latents(str(tmp_path / "lat"), num=32, shape=(4, 8, 8), mode="sample_flip",
                                    per_shard=16, num_classes=10, dtype="float32")
    p = _train(tmp_path, manifest, "train.total_steps=2")
    assert p.returncode == 0, p.stderr[-3000:]
    p = _train(tmp_path, manifest, "train.total_steps=3", "model.ig_layers=[3]", "loss.aux_weight=0.25")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "model.ig_layers: [2] -> [3]" in p.stderr and "loss.aux_weight: 0.5 -> 0.25" in p.stderr
    assert "Traceback" not in p.stderr
    p = _train(tmp_path, manifest, "train.total_steps=3", "optim.lr=5e-4")  # the LR may change on resume
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    p = _train(tmp_path, manifest, "train.total_steps=4", "model.ig_layers=[3]", "--allow-config-change")
    assert p.returncode == 0 and "config changes (allowed)" in p.stdout, p.stderr[-3000:]
    rec = [json.loads(line) for line in open(tmp_path / "run" / "config_changes.jsonl")]
    assert rec[-1]["changes"] == ["model.ig_layers: [2] -> [3]"]


def test_more_data_classes_than_model_classes_is_refused(tmp_path):
    manifest = write_random_latents(str(tmp_path / "lat"), num=16, shape=(4, 8, 8), mode="sample_flip",
                                    per_shard=16, num_classes=12, dtype="float32")
    p = _train(tmp_path, manifest, "train.total_steps=1")
    assert p.returncode == 2 and "the data has 12 classes" in p.stderr, p.stderr[-3000:]


def test_frozen_fields_of_a_config_saved_with_the_old_model_overrides():
    """A checkpoint whose config predates the typed model fields (model.overrides) compares field by field."""
    from igscale.config.load import load_config
    from igscale.core.typed import to_dict
    from igscale.training.resume_check import frozen_changes

    current = to_dict(load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml")))
    arch = {k: v for k, v in current["model"].items() if v is not None and k not in (
        "name", "activation_checkpointing", "compile", "compile_backend")}
    legacy = {**current, "model": {"name": "SiT-S/2", "overrides": arch, "compile": "none"}}
    assert frozen_changes(legacy, current) == []
    legacy["model"]["overrides"] = {**arch, "depth": 6}
    assert frozen_changes(legacy, current) == ["model.depth: 6 -> 4"]
    current["model"]["attn_backend"] = "sdpa"  # a kernel choice, free on resume
    assert frozen_changes(legacy, current) == ["model.depth: 6 -> 4"]
