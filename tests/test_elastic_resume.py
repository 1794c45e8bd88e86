"""Elastic resume with real DeepSpeed on gloo CPU ranks and the real S3 server: one epoch run as 2 ranks, then 1,
then 3 (ZeRO-3), against an uninterrupted 2-rank run; ZeRO-1 and ZeRO-2 resized 2 -> 1.

- data: the sample keys every rank trained on (logging.sample_keys) are the epoch, each exactly once;
- weights: after DeepSpeed's universal conversion they equal DeepSpeed's own fp32 consolidation of the saved
  tag bitwise (tests/elastic_probe.py resumes through the trainer and gathers them);
- optimizer: one step from the same gradients after the resume matches the step the saved world size takes, to
  the rounding of the gradient average (the bound below), while the step itself is far larger than that bound;
- EMA: the resumed, re-sliced EMA equals the consolidated saved one bitwise;
- loss: the resumed run's losses stay within the noise of the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.fixtures.s3server import free_ports
from tests.test_train_deepspeed import ROOT, _env, _losses, _run, write_tiny_latents

pytestmark = pytest.mark.slow

EPOCH, STEPS = 128, 11  # 128 samples; rounds of 12 (2 canonical ranks x 6): 10 full rounds and one of 8
COMMON = ("train.global_batch=12", "checkpoint.every_steps=3", "sample.every_steps=0", "logging.sample_keys=true",
          "checkpoint.keep_last=4")


@pytest.fixture(scope="module")
def data(s3_server):
    os.environ.update(s3_server.env)
    return write_tiny_latents(s3_server, s3_server.create_bucket(), num=EPOCH, per_shard=16)


def _go(run_dir, data, env, nproc, *overrides, timeout=300) -> str:
    return _run(run_dir, data.manifest, env, *COMMON, *overrides, timeout=timeout, nproc=nproc)


def _probe(run_dir, data, env, nproc, out, *overrides) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_ports(1)[0]}", "-m", "tests.elastic_probe", out, "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.yaml"), f"run_dir={run_dir}", f"data.manifest_url={data.manifest}",
           *COMMON, *overrides]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return torch.load(out, weights_only=True)


def _saved(url, tag, tmp) -> tuple[dict, dict]:
    """DeepSpeed's fp32 consolidation of the saved tag (its own utility) and the consolidated EMA."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from igscale.checkpoint import layout
    from igscale.checkpoint.store import Checkpointer

    local = Checkpointer(url, str(tmp)).download(tag, str(tmp / "full"))
    return (get_fp32_state_dict_from_zero_checkpoint(local, tag=tag),
            layout.consolidate_ema(os.path.join(local, tag)))


def _dry_run(capsys, data, *args) -> str:
    from igscale.cli.train import main as train_main

    flags = [a for a in args if a.startswith("--") or a.isdigit()]
    overrides = [a for a in args if a not in flags]
    capsys.readouterr()
    assert train_main(["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--dry-run", *flags,
                       f"data.manifest_url={data.manifest}", *COMMON, *overrides]) == 0
    return capsys.readouterr().out.splitlines()[-1]


def _seen(run_dir) -> list[tuple[int, int, int]]:
    """(step, world size, key) of every sample every rank trained on."""
    out = []
    d = os.path.join(run_dir, "sample_keys")
    for name in sorted(os.listdir(d)):
        for line in open(os.path.join(d, name)):
            r = json.loads(line)
            out += [(r["step"], r["world_size"], k) for k in r["keys"]]
    return out


# ZeRO-3 (the 1 -> 3 probe re-slices every partition); ZeRO-1/2 resize on one rank below
@pytest.mark.parametrize("stage,probe_step,probe_from,probe_to", [(3, 6, 1, 3)])
def test_two_then_one_then_three_ranks_within_one_epoch(data, s3_server, tmp_path, capsys, stage, probe_step,
                                                        probe_from, probe_to):
    env = _env(s3_server, tmp_path)
    url = f"s3://{data.bucket}/runs/elastic{stage}"
    run_dir = str(tmp_path / "run")
    z = f"engine.zero_stage={stage}"
    probes = {}
    for nproc, steps in ((2, 3), (1, 6), (3, STEPS)):
        if steps > probe_step and not probes:  # before the stage that resumes from probe_step
            for w in (probe_from, probe_to):
                probes[w] = _probe(run_dir, data, env, w, str(tmp_path / f"probe{w}.pt"), z, f"checkpoint.url={url}")
        out = _go(run_dir, data, env, nproc, z, f"checkpoint.url={url}", f"train.total_steps={steps}")
        if nproc != 2:
            saved_at = 2 if nproc == 1 else 1
            assert f"resuming at world size {nproc} from a checkpoint saved at world size {saved_at}" in out, out
    # every sample of the epoch exactly once, over the three world sizes
    seen = _seen(run_dir)
    assert {w for _, w, _ in seen} == {1, 2, 3}
    keys = sorted(k for _, _, k in seen)
    assert keys == list(range(EPOCH)), (len(keys), len(set(keys)))
    assert max(s for s, _, _ in seen) == STEPS - 1

    # weights and EMA through the conversion, bitwise; the optimizer state through the next update
    fp32, ema = _saved(url, f"step_{probe_step:09d}", tmp_path / "dl")
    ref, new = probes[probe_from], probes[probe_to]
    assert ref["step"] == new["step"] == probe_step
    for name, w in fp32.items():
        if name in new["master"]:
            assert torch.equal(new["master"][name], w.float()), name
            assert torch.equal(new["weights"][name], w), name
            assert torch.equal(new["ema"][name], ema[name]) and torch.equal(ref["ema"][name], ema[name]), name
    eps, lr = torch.finfo(torch.float32).eps, 1e-3
    worst = 0.0
    for name, a in ref["after"].items():
        b, w0 = new["after"][name], ref["master"][name]
        # identical state and weights; gradients differ by the rounding of a 1/2/3-way average (a few eps,
        # relative), which moves Adam's normalised update by a few eps of its size (<= ~3.2 lr early on) and the
        # final add by one rounding of |w|
        bound = 16 * eps * (w0.abs() + 3.2 * lr)
        assert ((a - b).abs() <= bound).all(), (name, (a - b).abs().max().item())
        worst = max(worst, (a - w0).abs().max().item())
    assert worst > 1e3 * 16 * eps * 3.2 * lr  # the step is far above the bound: a lost state would show

    # a dry run says what a start at another size would do (latest is step 11, saved by 3 ranks)
    plan = _dry_run(capsys, data, z, f"checkpoint.url={url}", "--world-size", "2")
    assert (f"resuming at world size 2 from a checkpoint saved at world size 3 ({url}/step_{STEPS:09d}, step "
            f"{STEPS}): weights and optimizer state through DeepSpeed's universal checkpoint, converted once") in plan
    assert "as saved: an exact resume" in _dry_run(capsys, data, z, f"checkpoint.url={url}", "--world-size", "3")
    assert "cannot start at world size 5" in _dry_run(capsys, data, z, f"checkpoint.url={url}", "--world-size", "5")

    # the loss continues: the elastic run vs an uninterrupted 2-rank run of the same epoch
    ref_dir = str(tmp_path / "ref")
    _go(ref_dir, data, env, 2, z, f"checkpoint.url={url}-ref", f"train.total_steps={STEPS}")
    a, b = _losses(run_dir), _losses(ref_dir)
    d = [a[s]["train/loss"] - b[s]["train/loss"] for s in range(4, STEPS + 1)]
    spread = torch.tensor([b[s]["train/loss"] for s in range(1, STEPS + 1)]).diff().abs().max().item()
    assert max(abs(x) for x in d) <= spread, (d, spread)


# DeepSpeed stage 0 (nothing to convert) resizes in tests/test_muon_sharded.py (igscale's ZeRO-1 Muon runs on it)
@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "bf16")])
def test_other_stages_resume_on_one_rank(data, s3_server, tmp_path, stage, precision):
    """ZeRO-1 and ZeRO-2 (bf16 weights, fp32 master partitions) go through the universal checkpoint; every sample
    of six rounds once, over the two world sizes."""
    env = _env(s3_server, tmp_path)
    run_dir, url = str(tmp_path / "run"), f"s3://{data.bucket}/runs/elastic{stage}{precision}"
    args = (f"engine.zero_stage={stage}", f"engine.precision={precision}", f"checkpoint.url={url}")
    _go(run_dir, data, env, 2, *args, "train.total_steps=3")
    out = _go(run_dir, data, env, 1, *args, "train.total_steps=6")
    assert "resuming at world size 1 from a checkpoint saved at world size 2" in out, out[-3000:]
    assert ("universal checkpoint in" in out) == (stage > 0), out[-3000:]
    keys = [k for _, _, k in _seen(run_dir)]
    assert len(keys) == 72 == len(set(keys))  # six rounds of 12, none repeated
    a = _losses(run_dir)
    assert all(torch.isfinite(torch.tensor(a[s]["train/loss"])) for s in range(1, 7))
