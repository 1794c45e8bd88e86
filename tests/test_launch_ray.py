"""launch/ray_submit.py on a real local Ray cluster (127.0.0.1), data and checkpoints on real S3 (SeaweedFS).

`ray job submit` runs the latent precompute (Ray tasks) and then a short Ray Train run (TorchTrainer, 2 CPU
workers, DeepSpeed ZeRO-2 over gloo inside). One train worker process is SIGKILLed mid-run: Ray Train's
FailureConfig restarts the worker group, which resumes from the last complete S3 checkpoint and finishes the run.
The job metadata records the resolved config.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.launch_helpers import ROOT, TINY, base_env, make_image_tree, max_step, precompute_args, train_overrides

pytestmark = pytest.mark.slow
SUBMIT = str(ROOT / "launch" / "ray_submit.py")
STEPS, EVERY = 60, 10


def _submit(ray_cluster, env, *args, timeout=300):
    cmd = [sys.executable, SUBMIT, "--address", ray_cluster.dashboard_url, "--python", sys.executable,
           "--pass-credentials", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _train_worker_pids(ray_cluster) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=ray_cluster.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if "TrainWorker" in a.class_name]


def test_ray_jobs_precompute_and_train_survive_a_killed_worker(ray_cluster, s3_server, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = {**base_env(s3_server.env, tmp_path), **ray_cluster.env}
    bucket = s3_server.create_bucket()
    images = make_image_tree(tmp_path / "images", classes=2, per_class=4)  # 8 images: 2 shards, 2 Ray tasks

    # 1. precompute as a Ray job (Ray tasks encode the shards)
    r = _submit(ray_cluster, env, "precompute", "--", *precompute_args(str(images), f"s3://{bucket}/latents"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "SUCCEEDED" in r.stdout
    manifest = json.loads(s3_server.client().get_object(Bucket=bucket, Key="latents/manifest.json")["Body"].read())
    assert manifest["num_samples"] == 8 and manifest["latent"]["shape"] == [4, 8, 8]

    # 2. train as a Ray job; kill one train worker once a checkpoint exists and training has moved past it
    run_dir = tmp_path / "run"
    ckpt = f"s3://{bucket}/ckpt/ray"
    r = _submit(ray_cluster, env, "--no-wait", "--max-failures=2", "--workers=auto", "train", "--", "--config", TINY,
                *train_overrides(run_dir, f"s3://{bucket}/latents/manifest.json", ckpt, STEPS),
                f"checkpoint.every_steps={EVERY}", "train.global_batch=8")
    assert r.returncode == 0, r.stdout + r.stderr
    sid = re.search(r"submission_id=(\S+)", r.stdout).group(1)
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    deadline = time.monotonic() + 180
    pids: list[int] = []
    while max_step(run_dir) < EVERY + 2:  # steps take ~0.1 s: look the worker PIDs up early, kill right away
        status = client.get_job_status(sid)
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(sid)[-5000:]
        assert time.monotonic() < deadline, client.get_job_logs(sid)[-5000:]
        if len(pids) < 2 and max_step(run_dir) >= 1:
            pids = _train_worker_pids(ray_cluster)
        time.sleep(0.05)
    assert len(pids) == 2, pids
    killed_at = max_step(run_dir)
    os.kill(pids[1], signal.SIGKILL)

    deadline = time.monotonic() + 240
    while client.get_job_status(sid) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, client.get_job_logs(sid)[-5000:]
        time.sleep(0.5)
    logs = client.get_job_logs(sid)
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED, logs[-6000:]
    assert killed_at < STEPS, "the run ended before the worker was killed"
    # the restarted group resumed from a checkpoint written before the kill, not from scratch
    resumed = [int(s) for s in re.findall(rf"resumed from {re.escape(ckpt)}/step_\d+ at step (\d+)", logs)]
    assert resumed and all(EVERY <= s <= killed_at + 1 for s in resumed), logs[-6000:]
    s3 = s3_server.client()
    assert s3.get_object(Bucket=bucket, Key="ckpt/ray/latest")["Body"].read().decode().strip() == f"step_{STEPS:09d}"
    assert max_step(run_dir) == STEPS
    # job metadata records the resolved config
    info = client.get_job_info(sid)
    cfg = json.loads(info.metadata["config"])
    assert info.metadata["igscale_command"] == "train"
    assert cfg["train"]["total_steps"] == STEPS and cfg["checkpoint"]["url"] == ckpt
    assert cfg["model"]["name"] == "SiT-S/2"
    assert s3_server.secret_key not in logs


def test_ray_submit_rejects_bad_config_before_submitting(tmp_path):
    r = subprocess.run([sys.executable, SUBMIT, "--address", "http://127.0.0.1:9", "train", "--", "--config", TINY,
                        "train.no_such_key=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "invalid train config" in r.stderr and "no_such_key" in r.stderr
    r = subprocess.run([sys.executable, SUBMIT, "train"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")})
    assert r.returncode == 2 and "no cluster address" in r.stderr
