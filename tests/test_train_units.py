"""Trainer building blocks without DeepSpeed: Muon, EMA, RNG streams, LR schedule, checkpointer on real S3."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from igscale.checkpoint.store import Checkpointer, tag_for
from igscale.training.ema import EMA
from igscale.training.lr_schedule import lr_at
from igscale.training.muon import MuonWithAdam, muon_param_groups, newton_schulz5
from igscale.training.rng import DROP, NOISE, stream_generator, stream_seed


# -- Muon ------------------------------------------------------------------------------------------------------
def _ref_muon_step(p, g, m, lr, wd, beta=0.95):
    """Independent float64 restatement of the official MuonWithAuxAdam update (no bf16), for one 2-D parameter."""
    m = m + (1 - beta) * (g - m)
    u = g + beta * (m - g)
    x = u / (u.norm() + 1e-7)
    tr = x.shape[0] > x.shape[1]
    x = x.T if tr else x
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    x = x.T if tr else x
    x = x * max(1.0, u.shape[0] / u.shape[1]) ** 0.5
    return p * (1 - lr * wd) - lr * 0.2 * max(p.shape) ** 0.5 * x, m


def test_newton_schulz_makes_singular_values_near_one():
    g = torch.randn(64, 24, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz5(g).double())
    assert s.shape == (24,) and s.min() > 0.5 and s.max() < 1.3  # quintic NS lands in ~[0.7, 1.2], not exactly 1
    assert torch.linalg.svdvals(g).max() > 3  # the input was far from orthogonal


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_muon_step_matches_reference(shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    b = torch.nn.Parameter(torch.randn(shape[0]))
    opt = MuonWithAdam(muon_param_groups([("w", w), ("b", b)], muon_lr=2e-3, muon_wd=0.1, momentum=0.95,
                                         ns_steps=5, adam_lr=1e-3, betas=(0.9, 0.95), eps=1e-8, adam_wd=0.0))
    ref_b = torch.nn.Parameter(b.detach().clone())
    adam = torch.optim.Adam([ref_b], lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    w0 = w.detach().double().clone()
    p, m = w0.clone(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        gw, gb = torch.randn(shape), torch.randn(shape[0])
        w.grad, b.grad, ref_b.grad = gw.clone(), gb.clone(), gb.clone()
        opt.step()
        adam.step()
        p, m = _ref_muon_step(p, gw.double(), m, 2e-3, 0.1)
    # NS runs in bf16 as upstream: compare the update (not the weights) at bf16-level relative precision
    rel = (w.detach().double() - p).norm() / (p - w0).norm()  # error relative to the size of the 3 updates
    assert rel < 0.05, rel
    torch.testing.assert_close(b.detach(), ref_b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
def test_muon_matches_torch_optim_muon(shape):
    """torch.optim.Muon is an independent implementation of the same update (momentum, Nesterov, bf16 quintic NS
    with the same coefficients, decoupled decay with the unadjusted lr). It scales the step by one shape rule, ours
    by both: for rows <= cols ours is its "match_rms_adamw" rule exactly; for rows > cols it is "original" at
    lr' = 0.2 sqrt(max(shape)) lr with the decay rescaled so that lr' * wd' = lr * wd."""
    rows, cols = shape
    lr, wd = 2e-3, 0.1
    if rows <= cols:
        t_lr, t_wd, rule = lr, wd, "match_rms_adamw"
    else:
        t_lr = 0.2 * max(shape) ** 0.5 * lr
        t_lr, t_wd, rule = t_lr, wd * lr / t_lr, "original"
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    ref = torch.nn.Parameter(w.detach().clone())
    wrong = torch.nn.Parameter(w.detach().clone())  # the other rule, to show the comparison can fail
    ours = MuonWithAdam(muon_param_groups([("w", w)], muon_lr=lr, muon_wd=wd, momentum=0.95, ns_steps=5,
                                          adam_lr=1e-3, betas=(0.9, 0.95), eps=1e-8, adam_wd=0.0))
    theirs = torch.optim.Muon([ref], lr=t_lr, weight_decay=t_wd, momentum=0.95, nesterov=True, ns_steps=5,
                              adjust_lr_fn=rule)
    other = torch.optim.Muon([wrong], lr=lr, weight_decay=wd, momentum=0.95, nesterov=True, ns_steps=5,
                             adjust_lr_fn="original" if rule == "match_rms_adamw" else "match_rms_adamw")
    w0 = w.detach().clone()
    for _ in range(3):
        g = torch.randn(shape)
        w.grad, ref.grad, wrong.grad = g.clone(), g.clone(), g.clone()
        ours.step()
        theirs.step()
        other.step()
    # both orthogonalise in bf16 (2**-8 relative per rounding) but fuse the NS products differently; over 5
    # iterations that stays within a few percent of the update, as for the float64 reference above
    rel = (w.detach() - ref.detach()).norm() / (ref.detach() - w0).norm()
    assert rel < 0.05, rel
    assert (w.detach() - wrong.detach()).norm() / (wrong.detach() - w0).norm() > 0.2


def test_muon_decay_uses_unadjusted_lr_and_skips_frozen():
    w = torch.nn.Parameter(torch.ones(8, 4))
    frozen = torch.nn.Parameter(torch.ones(1, 4, 4), requires_grad=False)
    groups = muon_param_groups([("w", w), ("pos", frozen)], muon_lr=0.1, muon_wd=0.5, momentum=0.95, ns_steps=5,
                               adam_lr=1e-3, betas=(0.9, 0.95), eps=1e-8, adam_wd=0.0)
    assert [len(g["params"]) for g in groups] == [1]  # frozen pos_embed is not optimised (upstream decays it)
    MuonWithAdam(groups).step()  # no grad -> zero update, decay only: 1 - 0.1 * 0.5
    torch.testing.assert_close(w.detach(), torch.full((8, 4), 0.95))


def test_muon_rejects_flattened_partitions():
    with pytest.raises(ValueError, match="flattened partitions"):
        MuonWithAdam([dict(params=[torch.nn.Parameter(torch.ones(10))], use_muon=True, lr=1e-3)])


# -- EMA, RNG, LR --------------------------------------------------------------------------------------------
def test_ema_matches_closed_form():
    w = torch.zeros(5)
    ema = EMA([("w", w)], decay=0.9)
    w += 1.0
    for _ in range(7):
        ema.update([("w", w)])
    torch.testing.assert_close(ema.shadow["w"], torch.full((5,), 1 - 0.9**7))
    assert ema.shadow["w"].dtype == torch.float32
    ema2 = EMA([("w", torch.zeros(5, dtype=torch.bfloat16))], decay=0.9)
    ema2.load_state_dict(ema.state_dict())
    torch.testing.assert_close(ema2.shadow["w"], ema.shadow["w"])
    with pytest.raises(ValueError, match="mismatch"):
        EMA([("v", w)]).load_state_dict(ema.state_dict())


def test_rng_streams_are_pure_functions_of_counters():
    a = torch.randn(100, generator=stream_generator(1, 0, 5, NOISE))
    assert torch.equal(a, torch.randn(100, generator=stream_generator(1, 0, 5, NOISE)))
    seeds = {stream_seed(1, r, s, k, m) for r in range(3) for s in range(50) for k in (NOISE, DROP) for m in (0, 1)}
    assert len(seeds) == 3 * 50 * 2 * 2
    b = torch.randn(100, generator=stream_generator(1, 1, 5, NOISE))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.35


def test_lr_schedule():
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 2e-4, 0) == 2e-4


# -- checkpointer on the real S3 server ------------------------------------------------------------------------
def _writer(step):
    def write(staging, tag):
        os.makedirs(os.path.join(staging, tag, "sub"), exist_ok=True)
        for i in range(3):
            torch.save({"step": step, "i": i}, os.path.join(staging, tag, "sub" if i else "", f"f{i}.pt"))
    return write


def test_checkpointer_latest_retention_and_download(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/run/ckpt"
    ck = Checkpointer(url, str(tmp_path / "stage"), keep_last=2, keep_every=4)
    assert ck.latest_tag() is None
    for step in range(1, 10):
        ck.save(step, _writer(step), meta={"nimg": step * 8})
    assert ck.latest_tag() == tag_for(9)
    assert ck.complete_tags() == [tag_for(s) for s in (4, 8, 9)]
    d = ck.download(tag_for(9), str(tmp_path / "dl"))
    assert torch.load(os.path.join(d, tag_for(9), "sub", "f2.pt"))["step"] == 9
    assert ck.read_meta(tag_for(9))["nimg"] == 72


def test_crash_during_upload_keeps_latest(s3_bucket, s3_server, tmp_path):
    url = f"s3://{s3_bucket}/ckpt"
    ck = Checkpointer(url, str(tmp_path / "stage"), keep_last=3)
    ck.save(1, _writer(1))
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_train_units import _writer
        from igscale.checkpoint.store import Checkpointer
        Checkpointer({url!r}, {str(tmp_path / "stage2")!r}).save(2, _writer(2))
    """)
    env = dict(os.environ, **s3_server.env, IGSCALE_FAULT_UPLOAD_KILL="2:2")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert ck.storage.exists(f"{tag_for(2)}/f0.pt")  # the save really was half done ...
    assert ck.latest_tag() == tag_for(1)  # ... and `latest` still names the previous complete checkpoint
    ck.save(3, _writer(3))  # the next successful save removes the dead partial one
    assert ck.complete_tags() == [tag_for(1), tag_for(3)] and not ck.storage.list(f"{tag_for(2)}/")


def test_latest_pointing_at_incomplete_is_an_error(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), str(tmp_path / "st"))
    ck.storage.put_text("latest", tag_for(5))
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        ck.latest_tag()
