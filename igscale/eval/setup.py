"""Shared composition for `igscale sample` and `igscale sweep`: model source, sampler settings, decoder."""
from __future__ import annotations

import argparse

import numpy as np
import torch

from igscale.config.typed import from_dict, to_dict
from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.presets import PRESETS, get_preset
from igscale.diffusion.samplers import SamplerConfig
from igscale.eval.generate import latents_to_uint8

__all__ = ["add_model_args", "add_sampler_args", "load_model", "sampler_from_args", "build_decoder"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of --export or --checkpoint)")
    g.add_argument("--export", help="igscale inference export: folder or s3:// prefix "
                   "(model.safetensors + model_config.json)")
    g.add_argument("--checkpoint", help="official IG checkpoint (.pt); needs --model and --checkpoint-kind")
    g.add_argument("--model", help='registry name for --checkpoint, e.g. "SiT-XL/2"')
    g.add_argument("--checkpoint-kind", choices=["sit", "lightningdit"], help="official codebase of --checkpoint")
    g = p.add_argument_group("decoder")
    g.add_argument("--vae", default="none", help="VAE kind for igscale.vae.build_vae (e.g. sd-vae-ft-ema, "
                   "va-vae-f16d32), or 'none' to store quantised latents (latent-space runs, not ADM-evaluable)")
    g.add_argument("--vae-weights", help="local folder / s3:// URL of the VAE weights")
    g.add_argument("--quantization", default=None, help="pixel quantisation of igscale.vae.decode_to_uint8 "
                   "(sit: 255*(x+1)/2 truncated; vavae: 127.5x+128 truncated); default: the VAE's own")


def add_sampler_args(p: argparse.ArgumentParser, *, guidance: bool = True) -> None:
    g = p.add_argument_group("sampler (a preset, then explicit overrides)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="published sampler + guidance settings")
    g.add_argument("--method", choices=["euler", "heun", "sde"])
    g.add_argument("--num-steps", type=int)
    g.add_argument("--shift", type=float)
    if guidance:
        g.add_argument("--w-cfg", type=float)
        g.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"))
        g.add_argument("--w-ig", type=float)
        g.add_argument("--ig-interval", type=float, nargs=2, metavar=("LO", "HI"))


def sampler_from_args(args, *, guidance_overrides: bool = True) -> tuple[SamplerConfig, GuidanceConfig]:
    """Preset (or defaults) with explicit flags applied; guidance flags are skipped when they are sweep axes."""
    s, g = get_preset(args.preset) if args.preset else (SamplerConfig(), GuidanceConfig())
    s_over = {k: v for k, v in (("method", args.method), ("num_steps", args.num_steps), ("shift", args.shift))
              if v is not None}
    g_over = {k: getattr(args, k, None) for k in ("w_cfg", "cfg_interval", "w_ig", "ig_interval")
              if guidance_overrides}
    g_over = {k: list(v) if isinstance(v, list | tuple) else v for k, v in g_over.items() if v is not None}
    return (from_dict(SamplerConfig, {**to_dict(s), **s_over}),
            from_dict(GuidanceConfig, {**to_dict(g), **g_over}))


def load_model(args) -> tuple[torch.nn.Module, dict]:
    """Build the model from --export or --checkpoint; returns (model in eval mode, JSON description)."""
    if bool(args.export) == bool(args.checkpoint):
        raise ValueError("give exactly one of --export (igscale inference export) or --checkpoint (official .pt)")
    if args.export:
        from igscale.eval.export_io import load_export

        model = load_export(args.export)
        src = {"export": args.export}
    else:
        if not (args.model and args.checkpoint_kind):
            raise ValueError("--checkpoint needs --model (e.g. SiT-XL/2) and --checkpoint-kind (sit|lightningdit)")
        from igscale.models.convert import load_official_checkpoint

        model = load_official_checkpoint(args.checkpoint, args.model, args.checkpoint_kind)
        src = {"checkpoint": args.checkpoint, "checkpoint_kind": args.checkpoint_kind}
    return model.eval(), {"source": src, "model_config": to_dict(model.config)}


def _to_nhwc_uint8(x) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4 and a.shape[1] == 3 and a.shape[-1] != 3:
        a = a.transpose(0, 2, 3, 1)
    if a.dtype != np.uint8:
        raise TypeError(f"decoder returned {a.dtype}, expected uint8 pixels")
    return np.ascontiguousarray(a)


def build_decoder(args, device) -> tuple:
    """(decode(latents) -> uint8 NHWC, JSON description)."""
    if args.vae == "none":
        return latents_to_uint8, {"vae": "none", "quantization": "127.5x+128 (latents)"}
    from igscale.vae import build_vae, decode_to_uint8  # the latent pipeline's adapter around diffusers

    vae = build_vae(args.vae, args.vae_weights)
    vae = vae.to(device).eval() if isinstance(vae, torch.nn.Module) else vae
    kw = {"quantization": args.quantization} if args.quantization else {}

    def decode(lat):
        with torch.no_grad():
            return _to_nhwc_uint8(decode_to_uint8(vae, lat, **kw))

    return decode, {"vae": args.vae, "vae_weights": args.vae_weights, "quantization": args.quantization or "default"}
