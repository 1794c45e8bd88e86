"""Small random-weight files in the published formats (diffusers VAE folder, ADM Inception state dict), for the
demo and tests, where no published weights may be downloaded. The real loaders read them unchanged."""
from __future__ import annotations

import os
import tempfile
from typing import Literal

import torch

from igscale.eval.inception import InceptionV3
from igscale.vae import VAE_KINDS


def save_random_vae(store, kind: Literal["sd-vae", "va-vae-f16d32"] = "sd-vae",
                    block_out_channels: tuple[int, ...] = (32, 32, 32, 32), seed: int = 0) -> None:
    """Write a small random-weight AutoencoderKL with `kind`'s structure (levels, latent channels) in the diffusers
    folder layout through a Storage: for tests and the demo, where no published weights may be downloaded."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    save_vae(AutoencoderKL(**dict(VAE_KINDS[kind], block_out_channels=block_out_channels)), store)


def save_vae(vae, store) -> None:
    """Write an AutoencoderKL as the published VAE folders are laid out (config.json +
    diffusion_pytorch_model.safetensors) through a Storage (local folder or s3:// prefix)."""
    with tempfile.TemporaryDirectory() as d:
        vae.save_pretrained(d, safe_serialization=True)
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            store.put_file(name, os.path.join(d, name))


def random_published_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published pytorch-fid file layout (no BN counters), scaled so activations stay O(1).

    For tests and the demo only: metrics computed with them exercise the code path and are not FIDs.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in InceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # the published file has no such buffers
        if k.endswith("running_var") or k.endswith("bn.weight"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean") or k.endswith(".bias"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        else:  # conv / fc weights, fan-in scaled
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    return sd
