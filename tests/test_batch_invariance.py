"""Inside `batch_invariant()`, a sample's model output and sampled latents are bitwise independent of its batch."""
import pytest
import torch

from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.noise import per_sample_randint, per_sample_randn
from igscale.diffusion.samplers import SamplerConfig, sample
from igscale.ops.linear import batch_invariant, linear
from tests.helpers_core import randomize_, tiny_model


def test_invariant_linear_matches_plain_linear():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    ref = x @ w.t() + b
    with batch_invariant():
        for xx in (x, x[:1], x[:, 0]):  # (B, N, D), B = 1, and (B, D)
            assert torch.allclose(linear(xx, w, b), ref[: xx.shape[0]] if xx.dim() == 3 else ref[:, 0], atol=1e-5)


@pytest.mark.parametrize("name", ["SiT-S/2", "LightningDiT-B/1"])
def test_model_forward_is_bitwise_batch_invariant(name):
    m = randomize_(tiny_model(name), std=0.05).eval()
    C, H, _ = m.config.latent_shape
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(14, C, H, H, generator=g), torch.rand(14, generator=g), torch.randint(0, 10, (14,), generator=g)
    with torch.no_grad(), batch_invariant():
        full = m(x, t, y)
        for bs in (1, 2, 3, 5, 8):
            parts = [m(x[i:i + bs], t[i:i + bs], y[i:i + bs]) for i in range(0, 14, bs)]
            for k in range(2):
                assert torch.equal(torch.cat([p[k] for p in parts]), full[k]), (bs, k)
    with torch.no_grad():  # the plain path agrees to rounding
        plain = m(x, t, y)
    assert torch.allclose(plain[0], full[0], atol=1e-5)


def test_guided_sde_samples_are_bitwise_batch_invariant():
    m = randomize_(tiny_model(), std=0.05).eval()
    seeds = list(range(10))
    cfg, g = SamplerConfig(method="sde", num_steps=6), GuidanceConfig(w_cfg=2.0, cfg_interval=(0.0, 0.7), w_ig=1.5)

    def run(ss):
        return sample(m, per_sample_randn(ss, (4, 8, 8)), per_sample_randint(ss, 10), cfg, g, null_class=10, seeds=ss)

    with batch_invariant():
        full = run(seeds)
        for bs in (1, 3, 4):
            assert torch.equal(torch.cat([run(seeds[i:i + bs]) for i in range(0, 10, bs)]), full), bs
