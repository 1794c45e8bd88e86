import math

import pytest
import torch

from igscale.diffusion.guidance import GuidanceConfig, GuidedVelocity, classifier_free_guidance, internal_guidance
from igscale.diffusion.interpolants import get_interpolant
from igscale.diffusion.losses import ig_loss
from igscale.diffusion.timesteps import sample_t, shift_time
from tests.helpers_core import GaussianVelocity, randomize_, tiny_model


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_conversions_round_trip(path):
    it = get_interpolant(path)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    xt, v = it.x_t(x0, eps, t), it.velocity(x0, eps, t)
    assert torch.allclose(it.x0_from_v(xt, v, t), x0) and torch.allclose(it.eps_from_v(xt, v, t), eps)
    assert torch.allclose(it.v_from_eps(xt, eps, t), v) and torch.allclose(it.v_from_x0(xt, x0, t), v)
    assert torch.allclose(it.v_from_score(xt, it.score_from_v(xt, v, t), t), v)
    if path == "linear":  # closed forms of the SiT convention
        assert torch.allclose(xt, (1 - t[:, None]) * x0 + t[:, None] * eps) and torch.allclose(v, eps - x0)
        assert torch.allclose(it.score_from_v(xt, v, t), (-(1 - t[:, None]) * v - xt) / t[:, None])


def test_score_of_gaussian_data_is_exact():
    # data N(0, s²): p_t = N(0, a² s² + t²), score = -x / (a² s² + t²)
    it, s = get_interpolant("linear"), 2.0
    x, t = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None], torch.full((7,), 0.4, dtype=torch.float64)
    v = GaussianVelocity.velocity(x, t, torch.zeros(1, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    var = 0.6**2 * s**2 + 0.4**2
    assert torch.allclose(it.score_from_v(x, v, t), -x / var)


def test_timestep_shift_matches_lightningdit_formula():
    # LightningDiT (t=0 noise): t' = s t / (1 + (s-1) t) with s = 0.3; igscale uses tau = 1 - t and shift 1/s.
    s = 0.3
    t_l = torch.linspace(0, 1, 125, dtype=torch.float64)
    theirs = 1 - s * t_l / (1 + (s - 1) * t_l)
    ours = shift_time(1 - t_l, 1 / s)
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert math.isclose(float(shift_time(torch.tensor(0.5, dtype=torch.float64), 1 / s)), 1 - 0.23076923, rel_tol=1e-6)


def test_t_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    u = sample_t(200_000, generator=g)
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    ln = sample_t(200_000, kind="logit_normal", generator=g, mean=0.0, std=1.0)
    logit = torch.log(ln / (1 - ln))
    assert abs(float(logit.mean())) < 0.01 and abs(float(logit.std()) - 1.0) < 0.01
    sh = sample_t(200_000, generator=g, shift=3.0)
    assert abs(float((sh < 0.5).float().mean()) - 0.25) < 0.005  # P(3u/(1+2u) < 1/2) = P(u < 1/4)
    with pytest.raises(ValueError, match="unknown t sampling"):
        sample_t(3, kind="beta")


def test_loss_hand_computed_values():
    # x0 = 1, eps = 3, t = 0.5 -> x_t = 2, v = eps - x0 = 2. The model returns constants D_f = 1, D_i = 4.
    x0, eps = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 3.0)
    seen = {}

    def model_fn(xt, t, y):
        seen["xt"] = xt
        return torch.ones_like(xt), torch.full_like(xt, 4.0)

    terms = ig_loss(model_fn, x0, torch.zeros(1, dtype=torch.long), torch.tensor([0.5]), eps)
    assert torch.allclose(seen["xt"], torch.full((1, 1, 2, 2), 2.0))
    assert float(terms["main"]) == 1.0 and float(terms["aux"]) == 4.0
    assert float(terms["loss"]) == 1.0 + 0.5 * 4.0
    # cosine term: D_f = (1, -1) per channel vs v = (2, 2) -> cos = 0 -> 1 - 0 = 1 per pixel
    x0c, epsc = torch.zeros(1, 2, 1, 1), torch.full((1, 2, 1, 1), 2.0)
    fn = lambda xt, t, y: (torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1), torch.zeros(1, 2, 1, 1))
    tc = ig_loss(fn, x0c, torch.zeros(1, dtype=torch.long), torch.tensor([0.5]), epsc, cosine_loss=True, aux_weight=0.0)
    assert math.isclose(float(tc["cos"]), 1.0, abs_tol=1e-6)
    assert math.isclose(float(tc["loss"]), float(tc["main"]) + 1.0, abs_tol=1e-6)


def test_aux_loss_gradients_reach_only_early_blocks_and_ig_head():
    m = randomize_(tiny_model(depth=5, ig_layers=(2,)), std=0.1)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    terms = ig_loss(m.forward_heads, x0, torch.tensor([1, 2]), torch.rand(2), eps,
                    drop_mask=torch.zeros(2, dtype=torch.bool))
    terms["aux"].mean().backward()
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        reached = p.grad is not None and p.grad.abs().sum() > 0
        late = name.startswith(("blocks.2.", "blocks.3.", "blocks.4.", "final_layer."))
        assert reached != late, f"{name}: aux gradient {'reached' if reached else 'missing'}"
    m.zero_grad()
    ig_loss(m.forward_heads, x0, torch.tensor([1, 2]), torch.rand(2), eps)["main"].mean().backward()
    assert m.ig_heads[0].linear.weight.grad is None or m.ig_heads[0].linear.weight.grad.abs().sum() == 0


def test_guidance_identities_and_official_composition():
    torch.manual_seed(0)
    df, di = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(internal_guidance(df, di, 1.0), df)
    assert torch.allclose(internal_guidance(df, di, 1.4), di + 1.4 * (df - di), atol=1e-6)  # the paper's form
    c, u = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(classifier_free_guidance(c, u, 1.0), c)

    # a model whose cond/uncond, final/intermediate outputs are all distinct
    def model(x, t, y):
        uncond = (y == 10).float()[:, None]
        return x * 2 + 1 + uncond * 5, x * 0.5 - 1 + uncond * 3

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    gv = GuidedVelocity(model, y, GuidanceConfig(w_cfg=1.5, w_ig=1.4), null_class=10)
    Fc, Ic = x * 2 + 1, x * 0.5 - 1
    Fu, Iu = Fc + 5, Ic + 3
    Gc, Gu = Ic + 1.4 * (Fc - Ic), Iu + 1.4 * (Fu - Iu)
    # float32 rounding of the two algebraically equal forms differs by ~1e-6 at these magnitudes
    assert torch.allclose(gv(x, 0.5), Gu + 1.5 * (Gc - Gu), atol=1e-5)
    # scale 1 switches each off
    assert torch.allclose(GuidedVelocity(model, y, GuidanceConfig(), 10)(x, 0.5), Fc)
    assert torch.allclose(GuidedVelocity(model, y, GuidanceConfig(w_ig=1.4), 10)(x, 0.5), Gc, atol=1e-5)


def test_intervals_and_unconditional_rows_only_where_cfg_active():
    calls = []

    def model(x, t, y):
        calls.append((float(t[0]), x.shape[0]))
        return x, x * 0

    g = GuidanceConfig(w_cfg=2.0, cfg_interval=(0.0, 0.7), w_ig=1.5, ig_interval=(0.2, 0.6))
    gv = GuidedVelocity(model, torch.zeros(3, dtype=torch.long), g, null_class=10)
    x = torch.ones(3, 2)
    assert torch.allclose(gv(x, 0.9), x)  # no CFG, no IG: D_f
    assert torch.allclose(gv(x, 0.65), x)  # CFG on (cond == uncond here), IG off
    assert torch.allclose(gv(x, 0.4), 1.5 * x)  # IG on: D_i + 1.5 (D_f - D_i) = 1.5 x
    assert [(round(t, 5), n) for t, n in calls] == [(0.9, 3), (0.65, 6), (0.4, 6)]
    assert gv.rows == 15 and gv.calls == 3
    with pytest.raises(ValueError, match="cfg_interval"):
        GuidanceConfig(cfg_interval=(0.8, 0.2))
