"""The training step's device-side decisions, on a real DeepSpeed engine over a one-rank gloo group (in process).

- a non-finite loss, a non-finite gradient behind a finite loss, or a requested halt leaves the weights and the
  optimizer state bitwise unchanged, with the update skipped through `found_inf` (no host sync in the step);
- with gradient accumulation a non-finite micro-batch voids the whole optimizer step;
- the step issues exactly one igscale collective per optimizer step, placed for the group's backend;
- no module outside igscale/distributed/collectives.py calls torch.distributed collectives directly.
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from tests.helpers_core import one_rank_group, randomize_, tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def group():
    yield from one_rank_group("gloo")


def _cfg(*overrides):
    from igscale.config.load import load_config

    return load_config(str(ROOT / "configs" / "tiny_cpu.yaml"),
                       ["data.manifest_url=unused", "train.global_batch=4", *overrides])


def _engine(cfg):
    from igscale.distributed.engine import DeepSpeedEngine

    torch.manual_seed(0)
    model = randomize_(tiny_model(), std=0.05)
    return DeepSpeedEngine(model, cfg, world_size=1)


def _batch(n=4, bad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    if bad:
        x[0, 0, 0, 0] = float("nan")
    return {"latent": x, "label": torch.randint(0, 10, (n,), generator=g)}


def _snapshot(engine):
    w = {n: v.detach().clone() for n, v in engine.param_views()}
    st = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
          for p, s in engine.optimizer.state.items()}
    return w, st


def _same(engine, snap) -> bool:
    w, st = snap
    now = {n: v.detach() for n, v in engine.param_views()}
    same_w = all(torch.equal(w[n], now[n]) for n in w)
    same_st = all(torch.equal(st[id(p)][k], v) if torch.is_tensor(v) else st[id(p)][k] == v
                  for p, s in engine.optimizer.state.items() for k, v in s.items())
    return same_w and same_st


def _step(engine, cfg, batches, step, **kw):
    from igscale.training.step import launch_step

    h = launch_step(engine, batches, cfg, rank=0, world_size=1, step=step, device=torch.device("cpu"))
    h.finish(**kw)
    return h.result()


ENGINES = [("2", "bf16"), ("2", "fp32"), ("0", "fp32"), ("0", "bf16")]


@pytest.mark.parametrize("stage,precision", ENGINES)
def test_nonfinite_loss_and_halt_skip_the_update_on_the_device(group, stage, precision, one_thread):
    cfg = _cfg(f"engine.zero_stage={stage}", f"engine.precision={precision}")
    eng = _engine(cfg)
    assert eng.device_skip  # fused AdamW: the skip is the optimizer's found_inf, not a host check
    # the EMA follows the fp32 master weights, never a bf16 working copy
    assert all(v.dtype == torch.float32 for _, v in eng.param_views())
    if precision == "bf16" and stage == "2":
        assert eng.ds_config["bf16"]["check_grad_overflow"] is False  # DeepSpeed's host-syncing check is off
    r = _step(eng, cfg, [_batch(seed=1)], 0)  # one real step first, so the optimizer state exists
    assert not r.skipped and r.loss > 0
    snap = _snapshot(eng)
    r = _step(eng, cfg, [_batch(bad=True)], 1)
    assert r.skipped and _same(eng, snap)
    r = _step(eng, cfg, [_batch(seed=2)], 2, halt=True)  # finite, but the caller voids it
    assert r.skipped and _same(eng, snap)
    r = _step(eng, cfg, [_batch(seed=3)], 3)
    assert not r.skipped and not _same(eng, snap)


def test_nonfinite_gradient_behind_a_finite_loss_is_skipped(group, one_thread):
    cfg = _cfg("engine.zero_stage=2", "engine.precision=bf16")
    eng = _engine(cfg)
    _step(eng, cfg, [_batch(seed=1)], 0)
    snap = _snapshot(eng)
    w = eng.module.final_layer.linear.weight
    h = w.register_hook(lambda g: torch.full_like(g, float("inf")))
    r = _step(eng, cfg, [_batch(seed=2)], 1)
    h.remove()
    assert r.loss == r.loss and abs(r.loss) != float("inf")  # the loss itself was finite
    assert _same(eng, snap)
    assert not _step(eng, cfg, [_batch(seed=3)], 2).skipped and not _same(eng, snap)


def test_a_nonfinite_micro_batch_voids_the_accumulated_step_and_one_collective_per_step(group, one_thread):
    from igscale.distributed.collectives import backend_device, calls

    cfg = _cfg("engine.zero_stage=2", "engine.precision=bf16", "engine.grad_accum=2")
    eng = _engine(cfg)
    n0 = calls["n"]
    _step(eng, cfg, [_batch(2, seed=1), _batch(2, seed=2)], 0)
    snap = _snapshot(eng)
    r = _step(eng, cfg, [_batch(2, seed=3), _batch(2, bad=True)], 1)
    assert r.skipped and _same(eng, snap)
    r = _step(eng, cfg, [_batch(2, seed=4), _batch(2, seed=5)], 2)
    assert not r.skipped and not _same(eng, snap)
    assert calls["n"] - n0 == 3  # one flag all-reduce per optimizer step, not per micro-batch
    assert backend_device() == torch.device("cpu")  # gloo


def test_collective_helper_places_tensors_for_the_backend(group):
    from igscale.distributed.collectives import all_gather, all_reduce, backend_device

    t = torch.tensor([1.0, 2.0])
    out = all_reduce(t, op="max")
    assert out.device == backend_device() == torch.device("cpu") and torch.equal(out, t)
    assert [p.tolist() for p in all_gather(torch.arange(3))] == [[0, 1, 2]]
    assert backend_device("gloo") == torch.device("cpu")
    if torch.cuda.is_available():
        assert backend_device("nccl").type == "cuda"


def test_no_direct_collectives_outside_the_helper():
    pat = re.compile(r"\bdist\.(all_reduce|all_gather|all_gather_object|broadcast|reduce_scatter|reduce)\(")
    bad = [str(p.relative_to(ROOT)) for d in ("igscale", "data_pipeline") for p in (ROOT / d).rglob("*.py")
           if p.name != "collectives.py" and pat.search(p.read_text())]
    assert not bad, bad


def _muon(model):
    from igscale.training.muon import MuonWithAdam, muon_param_groups

    return MuonWithAdam(muon_param_groups(model.named_parameters(), muon_lr=1e-2, muon_wd=0.0, momentum=0.95,
                                          ns_steps=5, adam_lr=1e-3, betas=(0.9, 0.95), eps=1e-8, adam_wd=0.0))


def test_muon_guard_refuses_what_would_not_run_muon(group, one_thread):
    """ZeRO-2 hands the optimizer flat partitions instead of matrices: refused at start-up with the reason. At
    ZeRO-0 the guard passes and the first step must run one Newton-Schulz per matrix. A Muon config whose model has
    no trainable matrix, which would silently train everything with Adam, is refused."""
    from igscale.distributed.engine import DeepSpeedEngine
    from igscale.training.muon import MuonGuard, NotMuonError
    from igscale.training.step import train_step

    cfg2 = _cfg("engine.zero_stage=2", "engine.precision=fp32")  # the schema refuses muon here; build it by hand
    torch.manual_seed(0)
    model = randomize_(tiny_model(), std=0.05)
    matrices = sum(p.ndim >= 2 for p in model.parameters() if p.requires_grad)
    eng = DeepSpeedEngine(model, cfg2, world_size=1, optimizer=_muon(model))
    with pytest.raises(NotMuonError, match="flattened tensor"):
        MuonGuard(eng.client_optimizer)

    cfg0 = _cfg("optim.name=muon", "engine.zero_stage=0", "engine.precision=fp32")
    torch.manual_seed(0)
    model = randomize_(tiny_model(), std=0.05)
    eng = DeepSpeedEngine(model, cfg0, world_size=1, optimizer=_muon(model))
    guard = MuonGuard(eng.client_optimizer)
    assert guard.matrices == matrices
    with pytest.raises(NotMuonError, match="ran Newton-Schulz 0 time"):
        guard.check_first_step()  # no step yet: as if the optimizer had skipped Muon
    guard = MuonGuard(eng.client_optimizer)
    train_step(eng, [_batch()], cfg0, rank=0, world_size=1, step=0, device=torch.device("cpu"))
    guard.check_first_step()

    for p in model.parameters():
        p.requires_grad_(p.ndim < 2)
    with pytest.raises(NotMuonError, match="no trainable >= 2-D weight"):
        MuonGuard(_muon(model))
