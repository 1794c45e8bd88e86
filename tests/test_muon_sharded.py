"""igscale's Muon at ZeRO-1, 2 and 3 (state and Newton-Schulz work divided over the ranks), with real DeepSpeed on
2 gloo ranks and latents streamed from the real S3 server.

- ten steps of a small LightningDiT+IG give bitwise the weights (and losses) of the reference Muon at ZeRO-0, from
  the same initial state; each rank orthogonalises only its share of the matrices;
- a SIGKILL mid-run, then the same command: the resumed run is bitwise the uninterrupted one; it then continues
  on one rank (the optimizer shards re-distributed);
- ZeRO-2 (DeepSpeed partitions the gradients) and ZeRO-3 (and the weights): the same at each stage; ZeRO-2 is
  bitwise the reference, ZeRO-3 bitwise the reference replayed on ZeRO-3's own gradients (tests/muon_zero_probe.py);
- the owner assignment balances the Newton-Schulz FLOPs; shards saved at one stage and world size load at another
  (into the replicated optimizer for a zero_stage 1 -> 0 resume, and a replicated state into the sharded one).
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.test_train_deepspeed import _env, _kill_all, _losses, _run, _start, _wait_for_step, write_tiny_latents

pytestmark = pytest.mark.slow

STEPS = 10
COMMON = ("model.name=LightningDiT-B/1", "model.input_size=8", "model.in_channels=4", "model.hidden_size=64",
          "model.depth=4", "model.num_heads=2", "optim.name=muon", "optim.muon_lr=1e-2", "engine.precision=fp32",
          "train.ema_decay=0.0", "sample.every_steps=0", "checkpoint.every_steps=5", f"train.total_steps={STEPS}")


@pytest.fixture(scope="module")
def data(s3_server):
    os.environ.update(s3_server.env)
    return write_tiny_latents(s3_server, s3_server.create_bucket())


@pytest.fixture(scope="module")
def reference(data, s3_server, tmp_path_factory):
    """The reference Muon (replicated, ZeRO-0), uninterrupted: (run dir, export state dict, checkpoint URL)."""
    tmp = tmp_path_factory.mktemp("muon0")
    url = f"s3://{data.bucket}/runs/muon0"
    _run(str(tmp / "run"), data.manifest, _env(s3_server, tmp), *COMMON, "engine.zero_stage=0",
         f"checkpoint.url={url}")
    return str(tmp / "run"), _export(url), url


def _export(url):
    from igscale.eval.export_io import load_export

    return load_export(url + "/export").state_dict()


def _kill_resume_and_shrink(stage, ref_dir, ref_w, data, env, tmp_path) -> tuple[str, str]:
    """SIGKILL a run after its step-5 checkpoint, then the same command: its weights must equal `ref_w` bitwise
    and its losses from step 6 on the uninterrupted run's in `ref_dir`. Then on, on one rank (the two ranks'
    optimizer shards re-distributed). Returns the resumed and the one-rank runs' output."""
    kill_dir, kill_url = str(tmp_path / "kill"), f"s3://{data.bucket}/runs/muon{stage}kill"
    args = (*COMMON, f"engine.zero_stage={stage}", f"checkpoint.url={kill_url}")
    p = _start(kill_dir, data.manifest, env, *args)
    _wait_for_step(kill_dir, 7, p, poll=0.005)
    _kill_all(p)
    out = _run(kill_dir, data.manifest, env, *args)
    assert f"resumed from {kill_url}/step_000000005 at step 5" in out, out[-3000:]
    got = _export(kill_url)
    for k, v in ref_w.items():
        assert torch.equal(got[k], v), k
    a, c = _losses(ref_dir), _losses(kill_dir)
    assert [a[s]["train/loss"] for s in range(6, STEPS + 1)] == [c[s]["train/loss"] for s in range(6, STEPS + 1)]
    shrunk = _run(kill_dir, data.manifest, env, *args, f"train.total_steps={STEPS + 2}", nproc=1)
    assert "resuming at world size 1 from a checkpoint saved at world size 2" in shrunk, shrunk[-3000:]
    assert sorted(_losses(kill_dir)) == list(range(1, STEPS + 3))
    return out, shrunk


def test_zero1_muon_is_the_reference_bitwise_and_resumes_exactly(reference, data, s3_server, tmp_path):
    ref_dir, ref_w, _ = reference
    env = _env(s3_server, tmp_path)
    url = f"s3://{data.bucket}/runs/muon1"
    run_dir = str(tmp_path / "run")
    out = _run(run_dir, data.manifest, env, *COMMON, "engine.zero_stage=1", f"checkpoint.url={url}")
    assert "optimizer=ShardedMuonWithAdam" in out and "Muon on" in out, out[-3000:]
    got = _export(url)
    for k, v in ref_w.items():
        assert torch.equal(got[k], v), k
    a, b = _losses(ref_dir), _losses(run_dir)
    assert [a[s]["train/loss"] for s in sorted(a)] == [b[s]["train/loss"] for s in sorted(b)]

    out, _ = _kill_resume_and_shrink(1, run_dir, ref_w, data, env, tmp_path)
    assert "optimizer=ShardedMuonWithAdam" in out, out[-3000:]


def test_owners_balance_newton_schulz_and_shards_load_at_any_world_size():
    from igscale.models import build_model
    from igscale.training.muon import muon_param_groups
    from igscale.training.muon_sharded import ShardedMuonWithAdam, assign_owners, ns_flops

    torch.manual_seed(0)
    model = build_model("LightningDiT-B/1", input_size=8, in_channels=4, hidden_size=64, depth=4, num_heads=2,
                        ig_layers=(2,))
    groups = lambda: muon_param_groups(model.named_parameters(), muon_lr=1e-2, muon_wd=0.0, momentum=0.95,  # noqa: E731
                                       ns_steps=5, adam_lr=1e-3, betas=(0.9, 0.95), eps=1e-8, adam_wd=0.0)
    for w in (2, 3, 8):
        owners = assign_owners(groups(), w)
        flops = [0.0] * w
        for g, own in zip(groups(), owners):
            for p, o in zip(g["params"], own):
                flops[o] += ns_flops(p.shape, 5) if g["use_muon"] else 0.0
        biggest = max(ns_flops(p.shape, 5) for g in groups() if g["use_muon"] for p in g["params"])
        assert max(flops) - min(flops) <= biggest  # greedy, largest first: within one matrix of even
    # every rank's state after a step, saved at 2 ranks, loads at 3: each new rank holds exactly its own tensors
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    shards = []
    for r in range(2):
        opt = ShardedMuonWithAdam(groups(), rank=r, world_size=2)
        opt._exchange = lambda: None  # no process group here: the step's local half is what is saved
        opt.step()
        shards.append(opt.state_dict())
    assert sum(len(s["state"]) for s in shards) == sum(p.requires_grad for p in model.parameters())
    for r in range(3):
        opt = ShardedMuonWithAdam(groups(), rank=r, world_size=3)
        opt.load_shards(shards)
        mine = {id(p) for ps in opt._mine for p in ps}
        assert {id(p) for p in opt.state} == mine and all(len(opt.state[p]) for p in opt.state)
    # a replicated (zero_stage 0) state, as DeepSpeed restores it, into the sharded optimizer: each rank its part
    from igscale.training.muon import MuonWithAdam

    full = MuonWithAdam(groups())
    full.step()
    for r in range(2):
        opt = ShardedMuonWithAdam(groups(), rank=r, world_size=2)
        opt.load_state_dict(full.state_dict())
        assert {id(p) for p in opt.state} == {id(p) for ps in opt._mine for p in ps}
        for p in opt.state:
            assert all(torch.equal(v, full.state[p][k]) for k, v in opt.state[p].items())


@pytest.mark.parametrize("stage", [2, 3])
def test_zero23_muon_resumes_exactly_after_sigkill(stage, reference, data, s3_server, tmp_path):
    """ZeRO-2 (gradients partitioned) and ZeRO-3 (weights too): a SIGKILL after the step-5 checkpoint, then the
    same command, gives bitwise the uninterrupted run. At ZeRO-2 that run is bitwise the ZeRO-0 reference (the
    same averaged gradients reach the same update); ZeRO-3's backward sums some gradient contributions in
    another order, so its exactness against the reference is checked on its own gradients (the probe test)."""
    ref_dir, ref_w, _ = reference
    env = _env(s3_server, tmp_path)
    if stage == 3:
        url = f"s3://{data.bucket}/runs/muon{stage}"
        _run(str(tmp_path / "run"), data.manifest, env, *COMMON, f"engine.zero_stage={stage}", f"checkpoint.url={url}")
        ref_dir, ref_w = str(tmp_path / "run"), _export(url)
    out, shrunk = _kill_resume_and_shrink(stage, ref_dir, ref_w, data, env, tmp_path)
    assert "optimizer=ZeroMuonWithAdam" in out, out[-3000:]
    # the resize takes the fp32 weights from DeepSpeed's consolidation of the saved partitions
    assert "fp32 weights consolidated from the saved ZeRO partitions" in shrunk, shrunk[-3000:]


def test_zero3_muon_is_the_reference_on_its_own_gradients(tmp_path):
    """ZeRO-3 on 2 ranks, 10 steps (tests/muon_zero_probe.py): replaying the whole gradients its owners updated
    from through the replicated reference MuonWithAdam, from the same initial weights, gives bitwise ZeRO-3's
    weights (the all-to-alls, the layout, the clipping, the LR and the optimizer state are all exact).

    Those gradients are ZeRO-0's up to the order of fp32 sums: DeepSpeed's ZeRO-3 linear sums the weight and bias
    gradients over the rows itself, and its hooks change the order in which the conditioning vector's consumers
    add up. The first two steps' gradients agree within 16 eps of each tensor's largest entry (measured: 1.3
    eps); a piece put in the wrong place, or a rank's contribution lost, is off by O(1) of that scale. After that
    the bf16 Newton-Schulz of the reference amplifies last-bit differences of near-low-rank gradients, so ten
    ZeRO-3 steps are compared through the replay instead of against ZeRO-0."""
    import subprocess
    import sys

    from igscale.config.load import load_config
    from igscale.models import build_model
    from igscale.training.muon import MuonWithAdam, muon_param_groups
    from tests.fixtures.s3server import free_ports
    from tests.test_train_deepspeed import ROOT

    out = str(tmp_path / "probe")
    overrides = [o for o in COMMON if not o.startswith(("checkpoint.", "train.total_steps"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_ports(1)[0]}",
           "-m", "tests.muon_zero_probe", out, *overrides, "train.global_batch=8"]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(f"{out}_{k}.pt", weights_only=True) for k in range(2)]
    g0 = ranks[0]["grads0"]
    g3 = [{**a, **b} for a, b in zip(ranks[0]["grads3"], ranks[1]["grads3"])]  # each rank holds its owned tensors
    assert len(g3) == 10 and all(len(g) == len(g0[0]) for g in g3)
    eps = torch.finfo(torch.float32).eps
    for step in (0, 1):
        for k in g0[step]:
            assert (g0[step][k] - g3[step][k]).abs().max() <= 16 * eps * g0[step][k].abs().max(), (step, k)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), overrides)
    o = cfg.optim
    model = build_model(cfg.model.name, **cfg.model.arch_overrides())
    model.load_state_dict(ranks[0]["init"])
    groups = muon_param_groups(model.named_parameters(), muon_lr=o.muon_lr, muon_wd=o.muon_weight_decay,
                               momentum=o.muon_momentum, ns_steps=o.muon_ns_steps, adam_lr=o.lr, betas=o.betas,
                               eps=o.eps, adam_wd=o.weight_decay)
    ref = MuonWithAdam(groups)  # the gradients were recorded after clipping
    tensors = [p for g in ref.param_groups for p in g["params"]]
    for grads in g3:
        for k, p in enumerate(tensors):
            p.grad = grads[k]
        ref.step()
    for n, v in model.state_dict().items():
        assert torch.equal(v, ranks[0]["final3"][n]), n


def test_zero23_shards_move_between_stages_and_world_sizes():
    """ZeRO-2/3 Muon shards have the format of the ZeRO-1 shards: saved at 2 ranks, they load into the replicated
    optimizer (every tensor's state), the ZeRO-1 one and the ZeRO-2/3 one at 3 ranks (each rank its own part)."""
    from igscale.models import build_model
    from igscale.training.muon import MuonWithAdam, muon_param_groups
    from igscale.training.muon_sharded import ShardedMuonWithAdam, merge_shards
    from igscale.training.muon_zero import ZeroMuonWithAdam

    torch.manual_seed(0)
    model = build_model("LightningDiT-B/1", input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                        ig_layers=(1,))
    groups = lambda: muon_param_groups(model.named_parameters(), muon_lr=1e-2, muon_wd=0.0, momentum=0.95,  # noqa: E731
                                       ns_steps=5, adam_lr=1e-3, betas=(0.9, 0.95), eps=1e-8, adam_wd=0.0)
    n = sum(p.requires_grad for p in model.parameters())
    shards = []
    for r in range(2):
        opt = ZeroMuonWithAdam(groups(), rank=r, world_size=2)
        opt._hold()  # the whole owned tensors a step works on (released between steps)
        for t in opt._full.values():
            t.copy_(torch.randn_like(t))
            t.grad.copy_(torch.randn_like(t))
        opt.inner.step()  # the owners' update, without DeepSpeed around it
        shards.append(opt.shard_state_dict())
    assert sorted(k for s in shards for k in s["state"]) == list(range(n))
    full = MuonWithAdam(groups())
    full.load_state_dict(merge_shards(shards))
    by_index = merge_shards(shards)["state"]
    for k, p in enumerate(p for g in full.param_groups for p in g["params"]):
        assert all(torch.equal(v, by_index[k][key]) for key, v in full.state[p].items())
    for r in range(3):
        z1 = ShardedMuonWithAdam(groups(), rank=r, world_size=3)
        z1.load_shards(shards)
        assert {id(p) for p in z1.state} == {id(p) for ps in z1._mine for p in ps}
        z3 = ZeroMuonWithAdam(groups(), rank=r, world_size=3)
        z3.load_shards(shards)
        assert sorted(z3.shard_state_dict()["state"]) == sorted(z3._mine)
        for k, st in z3.shard_state_dict()["state"].items():
            assert all(torch.equal(v, by_index[k][key]) for key, v in st.items())
