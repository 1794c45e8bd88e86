"""Official checkpoint layouts, written out independently here, load into IGDiT (random weights, no download)."""
import argparse

import pytest
import torch

from igscale.models.convert import (
    CheckpointMismatchError,
    load_inference_export,
    load_official_checkpoint,
    save_inference_export,
)

TINY = dict(input_size=8, hidden_size=64, depth=3, num_heads=2, num_classes=10, ig_layers=(2,))


def official_sit_keys(D, depth, p, C, classes, grid):
    """Key -> shape of the official SiT+IG state dict (sit.py), from the official code's description, not igscale."""
    k = {
        "pos_embed": (1, grid * grid, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        k.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    for head in ("final_layer.", "final_layer_xr."):
        k.update({
            head + "linear.weight": (p * p * C, D), head + "linear.bias": (p * p * C,),
            head + "adaLN_modulation.1.weight": (2 * D, D), head + "adaLN_modulation.1.bias": (2 * D,),
        })
    return k


def official_lightningdit_keys(D, depth, p, C, classes, grid, heads):
    H = int(2 / 3 * 4 * D)
    k = official_sit_keys(D, depth, p, C, classes, grid)
    for i in range(depth):
        b = f"blocks.{i}."
        for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            del k[b + "mlp." + n]
        k.update({
            b + "norm1.weight": (D,), b + "norm2.weight": (D,),
            b + "mlp.w12.weight": (2 * H, D), b + "mlp.w12.bias": (2 * H,),
            b + "mlp.w3.weight": (D, H), b + "mlp.w3.bias": (D,),
        })
    k["final_layer.norm_final.weight"] = (D,)
    k["final_layer_xr.norm_final.weight"] = (D,)
    hd = D // heads
    k["feat_rope.freqs_cos"] = (grid * grid, hd)  # EVA rope buffers: recomputed by igscale, dropped on load
    k["feat_rope.freqs_sin"] = (grid * grid, hd)
    return k


def _random(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in keys.items()}


def test_sit_checkpoint_loads_and_routes_the_ig_head(tmp_path):
    sd = _random(official_sit_keys(64, 3, 2, 4, 10, 4))
    path = tmp_path / "step-0004000.pt"
    # the official trainer stores its argparse.Namespace under "args"; that one class is allowed, nothing else
    args = argparse.Namespace(model="SiT-S/2", encoder_depth=2, global_batch_size=256)
    torch.save({"model": _random(official_sit_keys(64, 3, 2, 4, 10, 4), 1), "ema": sd, "opt": {}, "args": args}, path)
    m = load_official_checkpoint(str(path), "SiT-S/2", "sit", **TINY)
    assert torch.equal(m.ig_heads[0].linear.weight, sd["final_layer_xr.linear.weight"])  # ema picked, head renamed
    assert torch.equal(m.blocks[2].mlp.fc2.bias, sd["blocks.2.mlp.fc2.bias"])
    assert m.config.time_convention == "noise_at_1" and not m.training
    model_only = load_official_checkpoint(str(path), "SiT-S/2", "sit", which="model", **TINY)
    assert not torch.equal(model_only.pos_embed, m.pos_embed)


def test_lightningdit_checkpoint_with_module_prefixes_and_rope_buffers(tmp_path):
    keys = official_lightningdit_keys(64, 3, 1, 8, 10, 8, 2)
    ema = _random(keys)
    model = {"module.module." + k: v for k, v in _random(keys, 2).items()}  # double DDP wrapping
    path = tmp_path / "0040000.pt"
    torch.save({"model": model, "ema": ema, "opt": {}, "config": {}}, path)
    kw = dict(TINY, in_channels=8, patch_size=1)
    m = load_official_checkpoint(str(path), "LightningDiT-B/1", "lightningdit", **kw)
    assert torch.equal(m.blocks[0].mlp.w12.weight, ema["blocks.0.mlp.w12.weight"])
    assert torch.equal(m.pos_embed, ema["pos_embed"])  # loaded as stored (Muon decays it in the official run)
    assert m.config.time_convention == "noise_at_0"
    m2 = load_official_checkpoint(str(path), "LightningDiT-B/1", "lightningdit", which="model", **kw)
    assert torch.equal(m2.ig_heads[0].norm_final.weight, model["module.module.final_layer_xr.norm_final.weight"])


def test_strict_matching_lists_missing_and_unexpected_keys(tmp_path):
    sd = _random(official_sit_keys(64, 3, 2, 4, 10, 4))
    del sd["final_layer_xr.linear.bias"]
    sd["projectors.0.weight"] = torch.zeros(2)
    torch.save({"ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError) as e:
        load_official_checkpoint(str(tmp_path / "bad.pt"), "SiT-S/2", "sit", **TINY)
    assert "missing keys (1): ['ig_heads.0.linear.bias']" in str(e.value)
    assert "unexpected keys (1): ['projectors.0.weight']" in str(e.value)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_official_checkpoint(str(tmp_path / "none.pt"), "SiT-S/2", "sit")
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        load_official_checkpoint(str(tmp_path / "bad.pt"), "SiT-S/2", "edm")


def test_weights_only_load_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"ema": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_official_checkpoint(str(tmp_path / "evil.pt"), "SiT-S/2", "sit", **TINY)


def test_safetensors_inference_export_round_trip(tmp_path):
    sd = _random(official_sit_keys(64, 3, 2, 4, 10, 4))
    torch.save({"ema": sd}, tmp_path / "c.pt")
    m = load_official_checkpoint(str(tmp_path / "c.pt"), "SiT-S/2", "sit", **TINY)
    save_inference_export(m, str(tmp_path / "export"))
    m2 = load_inference_export(str(tmp_path / "export"))
    assert m2.config == m.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert all(torch.equal(a, b) for a, b in zip(m(x, t, y), m2(x, t, y)))
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_inference_export(str(tmp_path))
