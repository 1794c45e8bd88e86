"""launch/submit.sh on a real Slurm cluster (two slurmd "nodes" on 127.0.0.1), latents and checkpoints on real S3.

- A 2-node x 1-process tiny CPU training job (one torchrun per node, c10d rendezvous on the first node) reaches
  COMPLETED; its final checkpoint, `latest` pointer and inference export are on S3 and its TensorBoard event file
  holds the loss curve.
- Preemption: `scancel --batch --signal=USR1` mid-run -> the ranks checkpoint, the job requeues itself
  (`scontrol requeue`), is released with `scontrol update StartTime=now`, resumes from `latest` and finishes with
  exactly the uninterrupted job's loss trajectory.
- Bad invocations fail fast with a clear message.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.launch_helpers import ROOT, TINY, base_env, losses, make_image_tree, max_step, precompute_inline, train_overrides

pytestmark = pytest.mark.slow
SUBMIT = str(ROOT / "launch" / "submit.sh")
STEPS = 150  # ~10 s of CPU steps: long enough to preempt mid-run


@pytest.fixture(scope="module")
def latents(s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_latents")
    bucket = s3_server.create_bucket()
    manifest = precompute_inline(make_image_tree(tmp / "images"), f"s3://{bucket}/latents",
                                 base_env(s3_server.env, tmp))
    return bucket, manifest


def _sbatch(cluster, tmp: Path, env: dict, *args: str) -> int:
    r = cluster.cmd("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={tmp}/job-%j.out",
                    f"--chdir={ROOT}", SUBMIT, *args, env=env)
    return int(r.stdout.strip().split(";")[0])


def _out(tmp: Path, job: int) -> str:
    p = tmp / f"job-{job}.out"
    return p.read_text(errors="replace") if p.exists() else ""


def _job_env(s3_server, tmp: Path) -> dict:
    return {**base_env(s3_server.env, tmp), "IGSCALE_PYTHON": sys.executable}


def _preempt_and_wait_requeued(cluster, job: int, run_dir: Path, tmp: Path) -> None:
    """USR1 once the job has trained a few steps; returns when it has checkpointed and requeued itself (PENDING)."""
    deadline = time.monotonic() + 180
    while max_step(run_dir) < 3:
        assert time.monotonic() < deadline, _out(tmp, job)[-4000:]
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), _out(tmp, job)
        time.sleep(0.2)
    cluster.cmd("scancel", "--batch", "--signal=USR1", str(job))
    # The job checkpoints, requeues itself and waits for its BeginTime (about 2 minutes); the caller releases it.
    deadline = time.monotonic() + 120
    while True:
        info = cluster.job(job)
        if info["JobState"] == "PENDING" and int(info.get("Restarts", 0)) >= 1:
            break
        assert info["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED"), f"{info}\n{_out(tmp, job)}"
        assert time.monotonic() < deadline, f"not requeued: {info}\n{_out(tmp, job)[-4000:]}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def reference_job(slurm_cluster, s3_server, latents, tmp_path_factory):
    """An uninterrupted 2-node job (also the completed-job test's subject)."""
    bucket, manifest = latents
    tmp = tmp_path_factory.mktemp("slurm_ref")
    run_dir = tmp / "run"
    job = _sbatch(slurm_cluster, tmp, _job_env(s3_server, tmp), "train", "--config", TINY,
                  *train_overrides(run_dir, manifest, f"s3://{bucket}/ckpt/ref", STEPS))
    info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=240)
    assert info["JobState"] == "COMPLETED", f"{info}\n{_out(tmp, job)[-5000:]}"
    return job, tmp, run_dir, bucket


def test_submit_train_two_nodes_completes_with_s3_checkpoint_and_tensorboard(slurm_cluster, s3_server,
                                                                              reference_job):
    job, tmp, run_dir, bucket = reference_job
    info = slurm_cluster.job(job)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]", info
    out = _out(tmp, job)
    assert "on 2 node(s) x 1" in out and "igscale train finished" in out
    # no credential value ever reaches the job log
    assert s3_server.secret_key not in out and s3_server.access_key not in out
    # both ranks trained: world size 2 over the two "nodes", every step logged once by rank 0
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    s3 = s3_server.client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="ckpt/ref/")["Contents"]}
    final = f"step_{STEPS:09d}"
    assert s3.get_object(Bucket=bucket, Key="ckpt/ref/latest")["Body"].read().decode().strip() == final
    assert f"ckpt/ref/{final}/COMPLETE" in keys
    assert any(k.startswith(f"ckpt/ref/{final}/") and "trainer_rank00001" in k for k in keys), sorted(keys)
    assert "ckpt/ref/export/model.safetensors" in keys
    # TensorBoard event file written by rank 0 holds the loss curve
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert ev, list(run_dir.iterdir())
    acc = EventAccumulator(str(ev[0]))
    acc.Reload()
    scalars = acc.Scalars("train/loss")
    assert [s.step for s in scalars] == list(range(1, STEPS + 1))
    assert [pytest.approx(s.value, rel=1e-6) for s in scalars] == [losses(run_dir)[s.step] for s in scalars]


def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted_run(slurm_cluster, s3_server,
                                                                          latents, reference_job, tmp_path):
    _, _, ref_run, _ = reference_job
    bucket, manifest = latents
    run_dir = tmp_path / "run"
    job = _sbatch(slurm_cluster, tmp_path, _job_env(s3_server, tmp_path), "train", "--config", TINY,
                  *train_overrides(run_dir, manifest, f"s3://{bucket}/ckpt/preempt", STEPS))
    _preempt_and_wait_requeued(slurm_cluster, job, run_dir, tmp_path)
    preempted_at = max_step(run_dir)
    assert 3 <= preempted_at < STEPS, preempted_at
    s3 = s3_server.client()
    latest = s3.get_object(Bucket=bucket, Key="ckpt/preempt/latest")["Body"].read().decode().strip()
    assert latest == f"step_{preempted_at:09d}", (latest, preempted_at)
    # slurmd rejects a batch launch whose credential is not newer, in whole seconds, than the revocation of the
    # first attempt's ("Job credential revoked"); Slurm's own requeue delay avoids that, so keep a 2 s gap too.
    time.sleep(2)
    slurm_cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    out = _out(tmp_path, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{out[-5000:]}"
    assert "USR1 received" in out and "requeueing job" in out
    assert f"resumed from s3://{bucket}/ckpt/preempt/{latest} at step {preempted_at}" in out, out[-5000:]
    got, ref = losses(run_dir), losses(ref_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    # the resumed job draws exactly what the uninterrupted one did: identical loss trajectories
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-6, abs=1e-7)


def test_requeued_job_resumes_on_fewer_nodes_with_the_same_command(slurm_cluster, s3_server, latents, tmp_path):
    """Preempted on 2 nodes, requeued, and started again on 1 (scontrol update NumNodes=1 NumTasks=1): the same batch script
    and arguments resume at world size 1 from the 2-rank checkpoint (elastic resume) and finish."""
    bucket, manifest = latents
    run_dir = tmp_path / "run"
    job = _sbatch(slurm_cluster, tmp_path, _job_env(s3_server, tmp_path), "train", "--config", TINY,
                  *train_overrides(run_dir, manifest, f"s3://{bucket}/ckpt/shrink", STEPS))
    _preempt_and_wait_requeued(slurm_cluster, job, run_dir, tmp_path)
    saved_at = max_step(run_dir)
    time.sleep(2)  # see the test above
    slurm_cluster.cmd("scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1")
    slurm_cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    out = _out(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "1", f"{info}\n{out[-5000:]}"
    assert "on 2 node(s) x 1" in out and "on 1 node(s) x 1" in out
    assert "resuming at world size 1 from a checkpoint saved at world size 2" in out, out[-5000:]
    assert f"at step {saved_at}" in out
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_submit_rejects_bad_invocations(s3_server, tmp_path):
    import subprocess

    env = _job_env(s3_server, tmp_path)
    # outside a Slurm job
    r = subprocess.run(["bash", SUBMIT, "train"], env={k: v for k, v in env.items() if not k.startswith("SLURM_J")},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not inside a Slurm job" in r.stderr
    # inside a job: unknown mode, and S3 in use without credentials
    fake_job = {**env, "SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": str(ROOT)}
    r = subprocess.run(["bash", SUBMIT, "fly"], env=fake_job, capture_output=True, text=True)
    assert r.returncode == 2 and "must be train, sample or eval" in r.stderr
    no_creds = {k: v for k, v in fake_job.items() if k != "AWS_SECRET_ACCESS_KEY"}
    r = subprocess.run(["bash", SUBMIT, "train", "--config", TINY, "data.manifest_url=s3://b/m.json"],
                       env=no_creds, capture_output=True, text=True)
    assert r.returncode == 2 and "AWS_SECRET_ACCESS_KEY is not set" in r.stderr
    assert s3_server.access_key not in r.stderr + r.stdout
