"""VAE adapter: LDM-layout weights -> diffusers AutoencoderKL, checked against an LDM reference written here."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from igscale.latents.norm import LatentNorm
from igscale.vae import (
    VAE_KINDS,
    VAEError,
    build_vae,
    decode,
    decode_to_uint8,
    encode,
    quantize,
)


# --- A compact LDM KL autoencoder with the published key names (taming/LDM `model.py` structure). -------------
def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, -1).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).reshape(b, c, -1)  # (B, C, HW)
        w = torch.softmax(q @ k * c**-0.5, dim=-1)  # (B, HW, HW)
        v = self.v(h).reshape(b, c, -1)
        out = (v @ w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class LDMEncoder(nn.Module):
    def __init__(self, ch, ch_mult, nres, attn_levels, z):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block = nn.ModuleList([ResnetBlock(cin if j == 0 else ch * m, ch * m) for j in range(nres)])
            lvl.attn = nn.ModuleList([AttnBlock(ch * m) for _ in range(nres)] if i in attn_levels else [])
            if i != len(ch_mult) - 1:
                lvl.downsample = Down(ch * m)
            self.down.append(lvl)
            cin = ch * m
        self.mid, self.norm_out, self.conv_out = Mid(cin), _norm(cin), nn.Conv2d(cin, 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class LDMDecoder(nn.Module):
    def __init__(self, ch, ch_mult, nres, attn_levels, z):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in, self.mid = nn.Conv2d(z, cin, 3, padding=1), Mid(cin)
        ups = []
        for i in reversed(range(len(ch_mult))):
            cout = ch * ch_mult[i]
            lvl = nn.Module()
            lvl.block = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout) for j in range(nres + 1)])
            lvl.attn = nn.ModuleList([AttnBlock(cout) for _ in range(nres + 1)] if i in attn_levels else [])
            if i != 0:
                lvl.upsample = Up(cout)
            ups.insert(0, lvl)
            cin = cout
        self.up = nn.ModuleList(ups)  # indexed like the encoder (up.0 is the full-resolution level)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMAutoencoderKL(nn.Module):
    def __init__(self, ch, ch_mult, nres, attn_levels, z):
        super().__init__()
        self.encoder = LDMEncoder(ch, ch_mult, nres, attn_levels, z)
        self.decoder = LDMDecoder(ch, ch_mult, nres, attn_levels, z)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)

    def posterior(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # non-default values everywhere (GroupNorm affine too), so a swap shows
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5) + 0.02)
    return model


# VA-VAE structure (5 levels, 2 res blocks, attention at the 16x-downsampled level, z=32) at width 32.
VAVAE_SMALL = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), nres=2, attn_levels=(4,), z=32)
# SD-VAE structure (4 levels, no level attention, z=4) at width 32.
SDVAE_SMALL = dict(ch=32, ch_mult=(1, 2, 4, 4), nres=2, attn_levels=(), z=4)


@pytest.mark.parametrize("kind,arch,fmt", [("va-vae-f16d32", VAVAE_SMALL, "pt"),
                                           ("sd-vae", SDVAE_SMALL, "safetensors")])
def test_ldm_checkpoint_matches_reference(tmp_path, kind, arch, fmt):
    ref = _randomize(LDMAutoencoderKL(**arch)).eval()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["loss.logvar"] = torch.zeros(())  # training leftovers in the published file are ignored
    path = tmp_path / f"vae.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": sd, "global_step": 7}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    vae = build_vae(kind, str(path))
    n_params = sum(p.numel() for p in vae.parameters())
    assert n_params == sum(p.numel() for p in ref.parameters())
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    mean, std = encode(vae, x)
    with torch.no_grad():
        rmean, rstd = ref.posterior(x.permute(0, 3, 1, 2).float() / 127.5 - 1)
        rdec = ref.decode(rmean)
    f = 2 ** (len(arch["ch_mult"]) - 1)
    assert mean.shape == (2, arch["z"], 32 // f, 32 // f)
    torch.testing.assert_close(mean, rmean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(std, rstd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode(vae, rmean), rdec, rtol=1e-4, atol=1e-4)
    assert vae.igscale_info["weights_sha256"] and vae.igscale_info["kind"] == kind


def test_diffusers_folder_from_s3(s3_bucket, tmp_path):
    from diffusers import AutoencoderKL

    from igscale.storage import open_storage

    cfg = dict(VAE_KINDS["sd-vae"], block_out_channels=(32, 32, 64, 64))
    src = AutoencoderKL(**cfg)
    src.save_pretrained(tmp_path / "sdvae", safe_serialization=True)
    store = open_storage(f"s3://{s3_bucket}/weights/sdvae")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        store.put_file(name, tmp_path / "sdvae" / name)
    vae = build_vae("sd-vae", store.url())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, src.encode(x).latent_dist.mean)
    assert vae.config.scaling_factor == pytest.approx(0.18215)


def test_layout_errors(tmp_path):
    torch.save({"state_dict": {"foo.bar": torch.zeros(2), "baz.weight": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(VAEError, match=r"unknown VAE layout.*foo\.bar"):
        build_vae("va-vae-f16d32", str(tmp_path / "x.pt"))
    ref = LDMAutoencoderKL(**SDVAE_SMALL)
    torch.save(ref.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(VAEError, match="latent channels"):
        build_vae("va-vae-f16d32", str(tmp_path / "sd.pt"))
    with pytest.raises(VAEError, match="not found"):
        build_vae("sd-vae", str(tmp_path / "missing.pt"))
    with pytest.raises(VAEError, match="unknown VAE kind"):
        build_vae("flux-vae")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({}))
    with pytest.raises(VAEError, match="diffusers folder"):
        build_vae("sd-vae", str(tmp_path / "folder"))


def test_quantization_and_norm():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    sit = quantize(x, "sit")[0, 0, :, 0].tolist()
    vav = quantize(x, "vavae")[0, 0, :, 0].tolist()
    # sit: trunc(255*(x+1)/2); vavae: trunc(127.5*x+128), both clamped to [0, 255]
    assert sit == [0, 0, 0, 127, 191, 254, 255, 255]
    assert vav == [0, 0, 0, 128, 191, 255, 255, 255]
    with pytest.raises(ValueError):
        quantize(x, "round")
    z = torch.randn(2, 4, 3, 3)
    n = LatentNorm.per_channel([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(n.normalize(z)[:, 1], (z[:, 1] - 0.2) / 2.0)
    torch.testing.assert_close(n.denormalize(n.normalize(z)), z)
    s = LatentNorm.from_manifest({"vae": {"kind": "sd-vae"}})
    torch.testing.assert_close(s.normalize(z), z * 0.18215)


def test_decode_to_uint8_random_sd_vae():
    cfg_small = dict(VAE_KINDS["sd-vae"], block_out_channels=(32, 32, 32, 32))
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**cfg_small).eval()
    z = torch.randn(2, 4, 4, 4)
    img = decode_to_uint8(vae, z, quantization="sit", norm=LatentNorm.scalar())
    assert img.shape == (2, 32, 32, 3) and img.dtype == torch.uint8
    with torch.no_grad():
        x = vae.decode(z / 0.18215).sample
    assert torch.equal(img, (255 * (x + 1) / 2).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
