"""Periodic sample grids with IG on and off, drawn from the EMA weights on rank 0's training device.

Cost: 2 x num images x num_steps forward passes (x2 rows where CFG is on), e.g. 8 x 2 x 50 = 800 XL forwards
(~190 TFLOP) per grid, about a second on one H100-class GPU; docs/training.md puts it against the training compute.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from igscale.config.schema import RunConfig
from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.noise import per_sample_randn
from igscale.diffusion.samplers import SamplerConfig, sample
from igscale.models import ModelConfig, build_model_from_config

__all__ = ["make_sample_fn"]


def make_sample_fn(cfg: RunConfig, model_config: ModelConfig, device: torch.device | str = "cpu"
                   ) -> Callable[[dict], dict[str, torch.Tensor]]:
    """Returns fn(ema_state_dict) -> {"samples/ig_on": (N,C,H,W), "samples/ig_off": (N,C,H,W)} on the CPU.

    Sample i has seed S.seed + i (noise and labels), so a grid is comparable across steps and runs."""
    S = cfg.sample
    seeds = [S.seed + i for i in range(S.num)]
    sampler = SamplerConfig(method=S.method, num_steps=S.num_steps)
    shape = tuple(model_config.latent_shape)

    @torch.no_grad()
    def fn(state_dict: dict) -> dict[str, torch.Tensor]:
        with torch.device(device):
            model = build_model_from_config(model_config)
        model.load_state_dict(state_dict)
        model.eval()  # label dropout is a training-mode behaviour
        noise = per_sample_randn(seeds, shape, device=device)  # (N, C, H, W)
        y = torch.tensor([s % model_config.num_classes for s in seeds], device=device)
        out = {}
        for tag, w_ig in (("samples/ig_on", S.w_ig), ("samples/ig_off", 1.0)):
            guidance = GuidanceConfig(w_cfg=S.w_cfg, w_ig=w_ig)
            out[tag] = sample(model, noise, y, sampler, guidance, null_class=model_config.num_classes,
                              seeds=seeds).cpu()
        del model
        return out

    return fn
