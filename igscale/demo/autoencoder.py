"""The demo's own f8 autoencoder: diffusers' `AutoencoderKL` with SD-VAE's structure (4 levels, 4 latent channels),
narrow enough to train on a CPU in well under a minute, on the demo's toy images.

No published weights can be downloaded here, so the demo makes its own, then saves them exactly as the SD-VAE release
is laid out (a diffusers folder, `igscale.demo.weights.save_vae`). Precompute, sampling and the
grid then load it through `igscale.vae.build_vae("sd-vae", url)` like the real weights. After training its latent
channels are whitened (`whiten_latents`), so SD-VAE's scalar scaling (1.0) hands the diffusion model unit-scale
latents in every channel.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from igscale.vae import VAE_KINDS, to_model_pixels

__all__ = ["DEMO_VAE", "train_autoencoder", "whiten_latents", "reconstruction_mse", "heldout_mse"]

# SD-VAE's block structure at a fraction of its width (and one res-block per level)
DEMO_VAE = dict(VAE_KINDS["sd-vae"], block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                sample_size=64)


_OPPONENT = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, -0.5, 0.0], [0.25, 0.25, -0.5]])


def train_autoencoder(images: np.ndarray, *, steps: int = 300, batch_size: int = 16, crop: int = 32, lr: float = 2e-3,
                      kl_weight: float = 1e-6, chroma_weight: float = 8.0, seed: int = 0,
                      log: Callable[[str], None] = print):
    """Train on uint8 NHWC images; returns (AutoencoderKL in eval mode, final reconstruction MSE).

    Loss: pixel MSE + L1 of the reconstruction from a posterior sample, an extra weight on the colour-difference
    (chroma) part of the error, plus a small KL term that keeps the latent
    posterior a proper Gaussian (the SD-VAE recipe without its perceptual and adversarial terms). It trains on
    random `crop`-pixel crops (the network is convolutional, so it then runs on whole images): 4x fewer pixels per
    step at 32 of 64."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_all = to_model_pixels(np.ascontiguousarray(images), "cpu", torch.float32)
    vae = AutoencoderKL(**DEMO_VAE).train()
    with torch.no_grad():  # start the posterior std at ~0.05: a std of 1 would drown the colours in sampling noise
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(-6.0)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    t0, mse = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        x = x_all[torch.randint(len(x_all), (batch_size,), generator=g)]  # (B, 3, H, W)
        if crop and crop < x.shape[-1]:  # one random crop per batch, on the latent grid (multiples of 8)
            oy, ox = (8 * int(v) for v in torch.randint(0, (x.shape[-1] - crop) // 8 + 1, (2,), generator=g))
            x = x[..., oy:oy + crop, ox:ox + crop]  # (B, 3, crop, crop)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        mse_t = F.mse_loss(rec, x)
        # chroma is a small part of the pixel variance, so a plain RGB loss learns luminance long before colour
        diff = torch.einsum("cd,bdhw->bchw", _OPPONENT, rec - x)  # (B, 3, h, w) luminance, red-green, blue-yellow
        chroma = diff[:, 1:].square().mean()
        loss = mse_t + F.l1_loss(rec, x) + chroma_weight * chroma + kl_weight * post.kl().mean()
        for grp in opt.param_groups:  # cosine decay: a short run still ends on a settled model
            grp["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse = float(mse_t.detach())
        if step % 100 == 0 or step == steps:
            log(f"autoencoder step {step}/{steps}: reconstruction MSE {mse:.4f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(x_all[i:i + 64]).latent_dist.mean for i in range(0, min(len(x_all), 256), 64)])
    whiten_latents(vae, z.mean((0, 2, 3)), z.std((0, 2, 3)))
    return vae, mse


@torch.no_grad()
def whiten_latents(vae, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Re-parametrise the latent space to z' = (z - mu) / sd per channel, without changing what the autoencoder
    computes: the affine map is folded into the 1x1 quant_conv (encoder side) and its inverse into post_quant_conv
    (decoder side). A short training run leaves channels whose scales differ by 10x or more; under SD-VAE's one
    scalar scaling factor (1.0 afterwards) the small ones would drown in the diffusion noise."""
    c = vae.config.latent_channels
    q, pq = vae.quant_conv, vae.post_quant_conv  # Conv2d(2c, 2c, 1): [mean; logvar], Conv2d(c, c, 1)
    q.weight[:c] /= sd.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) / sd
    q.bias[c:] -= 2 * torch.log(sd)  # log-variance of z' = that of z - 2 log sd
    pq.bias += pq.weight[:, :, 0, 0] @ mu  # post_quant_conv(z' * sd + mu)
    pq.weight *= sd.view(1, c, 1, 1)
    vae.register_to_config(scaling_factor=1.0)


@torch.no_grad()
def reconstruction_mse(vae, images: np.ndarray) -> float:
    """Pixel MSE (in [-1, 1]) of uint8 NHWC images decoded from their posterior means, clamped as when saved."""
    err = []
    for i in range(0, len(images), 64):
        x = to_model_pixels(np.ascontiguousarray(images[i:i + 64]), "cpu", torch.float32)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        err.append(float((rec - x).square().mean()) * len(x))
    return sum(err) / len(images)


def heldout_mse(vae, images: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The trained autoencoder's reconstruction MSE on `images` beside the same network with random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    trained, random = reconstruction_mse(vae, images), reconstruction_mse(AutoencoderKL(**DEMO_VAE).eval(), images)
    return {"trained": trained, "random": random, "ratio": random / trained}
