import math

import pytest
import torch

from igscale.core.typed import ConfigError
from igscale.models import build_model, model_config, model_names
from igscale.models.layers import Rope2D, apply_rope, sincos_2d
from tests.helpers_core import randomize_, tiny_model


def test_official_parameter_counts():
    with torch.device("meta"):
        sit = build_model("SiT-XL/2")
        ldit = build_model("LightningDiT-XL/1")
    assert sit.num_params(include_ig_heads=False) == 675_111_184
    assert sit.num_params() - sit.num_params(include_ig_heads=False) == 2_674_960
    assert sit.num_params() == 677_786_144
    assert ldit.num_params(include_ig_heads=False) == 675_256_736
    assert ldit.num_params() - ldit.num_params(include_ig_heads=False) == 2_694_560
    assert ldit.num_params() == 677_951_296


@pytest.mark.parametrize("name", model_names())
def test_every_variant_shapes_on_meta(name):
    with torch.device("meta"):
        m = build_model(name)
        C, H, W = m.config.latent_shape
        x = torch.empty(2, C, H, W)
        d_f, d_i = m(x, torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert d_f.shape == d_i.shape == (2, C, H, W)
    fam = name.split("-")[0]
    assert (C, H) == ((32, 16) if fam == "LightningDiT" else (4, 32))


@pytest.mark.parametrize("name", ["SiT-S/2", "SiT-S/1", "DiT-B/4", "LightningDiT-B/1", "LightningDiT-B/2"])
def test_tiny_forward_and_multi_heads(name):
    m = randomize_(tiny_model(name, ig_layers=(1, 3))).eval()
    C, H, _ = m.config.latent_shape
    x = torch.randn(3, C, H, H)
    d_f, heads = m.forward_heads(x, torch.rand(3), torch.tensor([0, 1, 10]))
    assert d_f.shape == (3, C, H, H) and len(heads) == 2 and all(h.shape == d_f.shape for h in heads)
    t, y = torch.rand(3), torch.tensor([0, 1, 2])
    f2, i2 = m(x, t, y)  # forward returns the guidance head: the first entry of ig_layers
    assert torch.equal(i2, m.forward_heads(x, t, y)[1][0]) and not torch.equal(i2, m.forward_heads(x, t, y)[1][1])


def test_ig_head_init_zero_vs_xavier():
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    zero = tiny_model(ig_head_init="zero").eval()
    d_f, d_i = zero(x, t, y)
    assert torch.count_nonzero(d_f) == 0 and torch.count_nonzero(d_i) == 0  # both heads zero-init as official SiT
    xav = tiny_model(ig_head_init="xavier").eval()
    d_f, d_i = xav(x, t, y)
    assert torch.count_nonzero(d_f) == 0 and d_i.abs().sum() > 0  # LightningDiT: only final_layer is zeroed
    assert xav.ig_heads[0].adaLN_modulation[-1].weight.abs().sum() > 0


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model name 'SiT-XXL/2'.*SiT-XL/2"):
        build_model("SiT-XXL/2")
    with pytest.raises(ConfigError, match=r"ig_layer 0 is out of range.*\[1, 28\]"):
        model_config("SiT-XL/2", ig_layers=(0,))
    with pytest.raises(ConfigError, match=r"ig_layer 13 is out of range.*\[1, 12\]"):
        model_config("SiT-S/2", ig_layers=(13,))
    with pytest.raises(ConfigError, match=r"decoder_hidden_size 768 does not match hidden_size 384"):
        model_config("SiT-S/2", decoder_hidden_size=768)
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        model_config("SiT-S/2", hidden_size=100, num_heads=6)
    with pytest.raises(ConfigError, match="unknown config key"):
        model_config("SiT-S/2", encoder_depth=8)
    m = tiny_model()
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 4, 8, 8\), got \(2, 4, 16, 16\)"):
        m(torch.randn(2, 4, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long))


def test_sincos_table_layout_matches_mae_formula():
    D, g = 16, 3
    tab = sincos_2d(D, g)  # (9, 16)
    q = D // 4
    omega = [1 / 10000 ** (k / q) for k in range(q)]
    for i in range(g):
        for j in range(g):
            row = tab[i * g + j]
            # first half: w (column j) coordinate; second half: h (row i), each [sin | cos]
            exp = [math.sin(j * w) for w in omega] + [math.cos(j * w) for w in omega]
            exp += [math.sin(i * w) for w in omega] + [math.cos(i * w) for w in omega]
            assert torch.allclose(row, torch.tensor(exp, dtype=torch.float32), atol=1e-6)


def test_rope_is_relative_and_axis_layout():
    Dh, g = 8, 4
    cos, sin = Rope2D(Dh, g)()
    q, k = torch.randn(Dh, dtype=torch.float64), torch.randn(Dh, dtype=torch.float64)

    def score(p1, p2):  # q at token p1, k at token p2
        qr = apply_rope(q.float().expand(1, 1, g * g, Dh), cos, sin)[0, 0, p1]
        kr = apply_rope(k.float().expand(1, 1, g * g, Dh), cos, sin)[0, 0, p2]
        return float(qr @ kr)

    tok = lambda i, j: i * g + j
    # scores depend only on the 2-D offset between tokens
    assert math.isclose(score(tok(0, 0), tok(1, 2)), score(tok(2, 1), tok(3, 3)), rel_tol=1e-5, abs_tol=1e-5)
    assert math.isclose(score(tok(1, 0), tok(0, 1)), score(tok(3, 2), tok(2, 3)), rel_tol=1e-5, abs_tol=1e-5)
    # the first Dh/2 dims rotate with the row index, the last Dh/2 with the column index
    assert torch.allclose(cos[tok(2, 0), : Dh // 2], cos[tok(2, 3), : Dh // 2])
    assert torch.allclose(cos[tok(0, 2), Dh // 2:], cos[tok(3, 2), Dh // 2:])
    assert math.isclose(float(cos[tok(1, 0), 0]), math.cos(1.0), rel_tol=1e-6)  # frequency 1 for k=0
    assert math.isclose(float(cos[tok(1, 0), 2]), math.cos(10000 ** (-2 / (Dh // 2))), rel_tol=1e-6)


def test_noise_at_0_weights_see_flipped_time_and_velocity():
    a = randomize_(tiny_model("LightningDiT-B/1")).eval()
    b = tiny_model("LightningDiT-B/1", time_convention="noise_at_0").eval()
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 8, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([3, 4])
    fa, ia = a(x, 1 - t, y)
    fb, ib = b(x, t, y)
    assert torch.allclose(fb, -fa, atol=1e-6) and torch.allclose(ib, -ia, atol=1e-6)


def test_label_dropout_uses_null_class():
    m = randomize_(tiny_model()).eval()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([1, 2, 3, 4])
    mask = torch.tensor([True, False, True, False])
    out = m(x, t, y, drop_mask=mask)[0]
    ref = m(x, t, torch.where(mask, torch.full_like(y, 10), y))[0]
    assert torch.allclose(out, ref)
    m.train()
    torch.manual_seed(0)
    emb = m.y_embedder
    yy = torch.zeros(20000, dtype=torch.long)
    dropped = (emb(yy) == emb.embedding_table.weight[10]).all(1).float().mean()
    assert abs(float(dropped) - 0.1) < 0.01


def test_activation_checkpointing_matches():
    m = randomize_(tiny_model("LightningDiT-B/1"))
    x, t, y = torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 2])
    mask = torch.zeros(2, dtype=torch.bool)

    def grads():
        m.zero_grad()
        d_f, d_i = m(x, t, y, drop_mask=mask)
        (d_f.square().mean() + d_i.square().mean()).backward()
        return d_f.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    f0, g0 = grads()
    m.set_activation_checkpointing(True)
    f1, g1 = grads()
    assert torch.allclose(f0, f1) and all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g0, g1))


@pytest.mark.parametrize("name", ["SiT-S/2", "LightningDiT-B/1"])
def test_block_traces_without_graph_breaks(name):
    torch._dynamo.reset()
    m = randomize_(tiny_model(name, qk_norm=True)).eval()
    blk = m.blocks[0]
    h, c = torch.randn(2, m.config.num_tokens, 64), torch.randn(2, 64)
    rope = m.rope() if m.rope is not None else None
    compiled = torch.compile(blk, backend="eager", fullgraph=True)  # fullgraph: any graph break raises
    assert torch.allclose(compiled(h, c, rope), blk(h, c, rope), atol=1e-6)
