import random

import pytest
import torch

from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.noise import per_sample_randint, per_sample_randn
from igscale.diffusion.presets import PRESETS, get_preset
from igscale.diffusion.samplers import SamplerConfig, sample
from tests.helpers_core import GaussianVelocity, randomize_, tiny_model

MU = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
S = torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)


def _ode_error(method: str, steps: int) -> float:
    model = GaussianVelocity(MU, S)
    z = per_sample_randn(range(64), (3,), dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)
    x0 = sample(model, z, y, SamplerConfig(method=method, num_steps=steps), null_class=1)
    exact = MU + S * z  # the exact probability-flow map of N(0, I) -> N(mu, diag s²) on the linear path
    return float((x0 - exact).abs().max())


def test_ode_samplers_reproduce_mean_and_covariance():
    model = GaussianVelocity(MU, S)
    z = per_sample_randn(range(20000), (3,), dtype=torch.float64)
    x0 = sample(model, z, torch.zeros(20000, dtype=torch.long), SamplerConfig(method="heun", num_steps=128), null_class=1)
    ref = MU + S * z
    assert torch.allclose(x0, ref, atol=1e-3)  # Heun at 128 steps: max error 5.7e-4 on this target
    assert torch.allclose(x0.mean(0), MU[0], atol=0.05)
    cov = torch.cov(x0.T)
    assert torch.allclose(cov.diagonal(), S**2, rtol=0.05)
    assert cov.fill_diagonal_(0).abs().max() < 0.1


def test_convergence_orders_euler_and_heun():
    e_ratio = _ode_error("euler", 32) / _ode_error("euler", 64)
    h_ratio = _ode_error("heun", 32) / _ode_error("heun", 64)
    assert 1.7 < e_ratio < 2.3, e_ratio
    assert 3.4 < h_ratio < 4.6, h_ratio


def test_sde_matches_target_statistically():
    torch.manual_seed(0)
    model = GaussianVelocity(MU, S)
    n = 20000
    z = torch.randn(n, 3, dtype=torch.float64)
    x0 = sample(model, z, torch.zeros(n, dtype=torch.long), SamplerConfig(method="sde", num_steps=250), null_class=1)
    se = S / n**0.5
    assert ((x0.mean(0) - MU[0]).abs() < 5 * se + 0.02).all(), x0.mean(0)
    assert torch.allclose(x0.var(0), S**2, rtol=0.06), x0.var(0)
    # the SDE is stochastic: it must not collapse onto the deterministic ODE map
    assert (x0 - (MU + S * z)).abs().mean() > 0.1


@pytest.mark.parametrize("method", ["sde", "heun"])
def test_per_sample_determinism_batch_and_order(method):
    model = GaussianVelocity(MU.repeat(4, 1) + torch.arange(4.0)[:, None], S)
    seeds = list(range(100, 107))
    cfg = SamplerConfig(method=method, num_steps=12)
    g = GuidanceConfig(w_cfg=1.5, cfg_interval=(0.0, 0.7), w_ig=1.3)

    def run(ss):
        z = per_sample_randn(ss, (3,), dtype=torch.float64)
        y = per_sample_randint(ss, 3)
        return sample(model, z, y, cfg, g, null_class=3, seeds=ss)

    full = run(seeds)
    singles = torch.cat([run([s]) for s in seeds])
    perm = seeds[:]
    random.Random(0).shuffle(perm)
    shuffled = run(perm)
    assert torch.equal(full, singles)
    assert torch.equal(full, shuffled[[perm.index(s) for s in seeds]])


def test_per_sample_determinism_with_a_real_model():
    m = randomize_(tiny_model(), std=0.05).eval()
    seeds = list(range(7))
    cfg, g = SamplerConfig(method="sde", num_steps=6), GuidanceConfig(w_cfg=2.0, w_ig=1.5)

    def run(ss):
        return sample(m, per_sample_randn(ss, (4, 8, 8)), per_sample_randint(ss, 10), cfg, g, null_class=10, seeds=ss)

    full = run(seeds)
    singles = torch.cat([run([s]) for s in seeds])
    assert torch.allclose(full, singles, atol=1e-5, rtol=1e-5)
    assert m.training is False


def test_model_in_train_mode_is_sampled_in_eval_mode_and_restored():
    m = randomize_(tiny_model()).train()
    z, y = per_sample_randn([0, 1], (4, 8, 8)), torch.tensor([1, 2])
    a = sample(m, z, y, SamplerConfig(num_steps=3), null_class=10)
    b = sample(m.eval(), z, y, SamplerConfig(num_steps=3), null_class=10)
    assert torch.equal(a, b)


def test_cfg_cost_only_inside_interval():
    model = GaussianVelocity(MU.repeat(2, 1), S)
    z, y = per_sample_randn(range(4), (3,)), torch.zeros(4, dtype=torch.long)
    _, st_ig = sample(model, z, y, SamplerConfig(num_steps=10), GuidanceConfig(w_ig=1.5), null_class=1,
                      return_stats=True)
    _, st_cfg = sample(model, z, y, SamplerConfig(num_steps=10), GuidanceConfig(w_ig=1.5, w_cfg=1.5,
                       cfg_interval=(0.0, 0.5)), null_class=1, return_stats=True)
    assert st_ig["rows_per_sample"] == 10 and st_ig["calls"] == 10
    assert st_cfg["rows_per_sample"] == 10 + 5  # grid 1.0, 0.9, ..., 0.1: t <= 0.5 at 5 of 10 steps


def test_presets_in_igscale_convention():
    s, g = get_preset("sit-xl2-ig-cfg-fid1.46")
    grid = s.time_grid()
    assert s.nfe() == 250 and len(grid) == 251 and float(grid[-2]) == pytest.approx(0.04) and float(grid[-1]) == 0
    assert (g.w_cfg, g.cfg_interval, g.w_ig, g.ig_interval) == (1.35, (0.0, 0.7), 1.4, (0.0, 1.0))
    s, g = get_preset("lightningdit-xl1-ig-cfg-fid1.19")
    assert s.nfe() == 248 and (g.w_cfg, g.w_ig) == (1.45, 1.4)
    # the official grid: 125 points, shift 0.3 in LightningDiT's direction; CFG on at their t >= 0.19
    t_l = torch.linspace(0, 1, 125, dtype=torch.float64)
    theirs = 0.3 * t_l / (1 + (0.3 - 1) * t_l)
    assert torch.allclose(s.time_grid(), 1 - theirs, atol=1e-12)
    starts = s.time_grid()[:-1]
    assert sum(g.cfg_on(float(t)) for t in starts) == int((theirs[:-1] >= 0.19).sum()) == 69
    s, g = get_preset("lightningdit-xl1-ig-fid1.34")
    assert g.w_ig == 1.7 and g.w_cfg == 1.0
    assert set(PRESETS) == {"sit-xl2-ig-cfg-fid1.46", "lightningdit-xl1-ig-cfg-fid1.19", "lightningdit-xl1-ig-fid1.34"}
    with pytest.raises(ValueError, match="unknown sampler preset"):
        get_preset("nope")


class _ConstantHeads:
    """D_f, D_i constant in x and t, chosen per row by conditional (label 0) vs null label: every guided velocity is a
    small exact binary fraction, so a two-step Heun can be computed by hand."""

    def __init__(self, f_c, i_c, f_u, i_u, null_class=1):
        self.v, self.null = (f_c, i_c, f_u, i_u), null_class

    def __call__(self, x, t, y):
        f_c, i_c, f_u, i_u = self.v
        null = (y == self.null).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        d_f = torch.ones_like(x) * (f_c + (f_u - f_c) * null)
        d_i = torch.ones_like(x) * (i_c + (i_u - i_c) * null)
        return d_f, d_i


@pytest.mark.parametrize("rule, expected", [("step_start", 0.0), ("eval_time", 0.5)])
def test_cfg_interval_rule_two_step_heun_by_hand(rule, expected):
    # Grid 1 -> 0.5 -> 0 (dt = -0.5, Heun: z += dt/2·(k1 + k2)), CFG 2 on t <= 0.6, F_c = 1, F_u = 3: the guided v is
    # 3 + 2·(1 - 3) = -1 where CFG is on and 1 where it is off. Step 1 starts at t=1 (off); its second stage
    # evaluates at t=0.5 (inside). Step 2 is inside for both rules: k = (-1, -1), +0.5.
    #   step_start: step 1 k = (1, 1)  -> -0.5;  then +0.5 -> 0.0
    #   eval_time:  step 1 k = (1, -1) ->  0.0;  then +0.5 -> 0.5
    model = _ConstantHeads(f_c=1.0, i_c=1.0, f_u=3.0, i_u=3.0)
    g = GuidanceConfig(w_cfg=2.0, cfg_interval=(0.0, 0.6), interval_at=rule)
    x = torch.zeros(2, 3, dtype=torch.float64)
    out = sample(model, x, torch.zeros(2, dtype=torch.long), SamplerConfig(method="heun", num_steps=2), g, null_class=1)
    assert torch.equal(out, torch.full_like(x, expected))


@pytest.mark.parametrize("rule, expected", [("step_start", -1.5), ("eval_time", -1.75)])
def test_ig_interval_rule_two_step_heun_by_hand(rule, expected):
    # IG 2 on t <= 0.6 with D_f = 1, D_i = 0: v = 1 + (2-1)·(1-0) = 2 inside, 1 outside. dt = -0.5 on both steps.
    #   step_start: step 1 k = (1, 1) -> -0.5;  step 2 k = (2, 2) -> -1.0;  total -1.5
    #   eval_time:  step 1 k = (1, 2) -> -0.75; step 2 k = (2, 2) -> -1.0;  total -1.75
    model = _ConstantHeads(f_c=1.0, i_c=0.0, f_u=1.0, i_u=0.0)
    g = GuidanceConfig(w_ig=2.0, ig_interval=(0.0, 0.6), interval_at=rule)
    x = torch.zeros(2, 3, dtype=torch.float64)
    out = sample(model, x, torch.zeros(2, dtype=torch.long), SamplerConfig(method="heun", num_steps=2), g, null_class=1)
    assert torch.equal(out, torch.full_like(x, expected))


def test_interval_rules_agree_for_one_evaluation_per_step():
    model = _ConstantHeads(f_c=1.0, i_c=0.5, f_u=3.0, i_u=2.0)
    x = torch.zeros(2, 3, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    outs = [sample(model, x, y, SamplerConfig(method=m, num_steps=7), GuidanceConfig(
        w_cfg=1.5, cfg_interval=(0.0, 0.6), w_ig=1.25, ig_interval=(0.3, 1.0), interval_at=rule), null_class=1, seeds=[0, 1])
        for m in ("euler", "sde") for rule in ("step_start", "eval_time")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])
    with pytest.raises(ValueError, match="interval_at"):
        GuidanceConfig(interval_at="midpoint")


def test_presets_use_their_family_interval_rule():
    assert PRESETS["sit-xl2-ig-cfg-fid1.46"].guidance.interval_at == "step_start"
    assert all(PRESETS[n].guidance.interval_at == "eval_time"
               for n in ("lightningdit-xl1-ig-cfg-fid1.19", "lightningdit-xl1-ig-fid1.34"))


def test_without_a_preset_the_interval_rule_follows_the_model_family():
    from types import SimpleNamespace

    from igscale.eval.setup import family_interval_rule, sampler_from_args

    assert family_interval_rule("SiT-XL/2") == family_interval_rule("DiT-B/2") == "step_start"
    assert family_interval_rule("LightningDiT-XL/1") == "eval_time"
    assert family_interval_rule("custom", "lightningdit") == "eval_time" and family_interval_rule("custom") == "eval_time"
    sit = SimpleNamespace(config=SimpleNamespace(name="SiT-S/2"))
    args = SimpleNamespace(preset=None, method=None, num_steps=None, shift=None, interval_at=None, checkpoint_kind=None,
                           w_cfg=None, cfg_interval=None, w_ig=None, ig_interval=None)
    assert sampler_from_args(args, model=sit)[1].interval_at == "step_start"
    args.interval_at = "eval_time"  # an explicit flag wins
    assert sampler_from_args(args, model=sit)[1].interval_at == "eval_time"
    args.interval_at, args.preset = None, "lightningdit-xl1-ig-cfg-fid1.19"  # a preset keeps its own rule
    assert sampler_from_args(args, model=sit)[1].interval_at == "eval_time"
