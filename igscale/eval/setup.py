"""Shared composition for `igscale sample`, `sweep`, `tune` and `reproduce`: model source, sampler settings,
decoder, Inception scorer.

Each function reads the fields of one section of igscale.eval.commands (ModelSource, SamplerArgs + GuidanceArgs,
DecoderArgs) by attribute, so it takes a command config or any object with those attributes.
"""
from __future__ import annotations

import json

import torch

from igscale.core.typed import from_dict, to_dict
from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.presets import find_preset, get_preset
from igscale.diffusion.samplers import SamplerConfig
from igscale.eval.generate import latents_to_uint8

__all__ = ["family_interval_rule", "sampling_precision", "load_model", "sampler_from_args", "build_decoder", "load_scorer"]


def family_interval_rule(model_name: str, checkpoint_kind: str | None = None) -> str:
    """The official interval rule of a model family: the SiT samplers decide at each step's start, LightningDiT's
    Heun at every evaluation; other models get eval_time."""
    name = model_name.lower()
    if checkpoint_kind == "lightningdit" or name.startswith("lightningdit"):
        return "eval_time"
    if checkpoint_kind == "sit" or name.startswith(("sit-", "dit-")):
        return "step_start"
    return "eval_time"


def sampler_from_args(args, *, model=None, guidance_overrides: bool = True) -> tuple[SamplerConfig, GuidanceConfig]:
    """Preset (or defaults) with explicit flags applied; guidance flags are skipped when they are sweep axes.
    `model`: without a preset, the interval rule defaults to its family's official one."""
    s, g = get_preset(args.preset) if args.preset else (SamplerConfig(), GuidanceConfig())
    rule = getattr(args, "interval_at", None)
    if rule is None and not args.preset and model is not None:
        rule = family_interval_rule(model.config.name, getattr(args, "checkpoint_kind", None))
    if rule is not None:
        g = from_dict(GuidanceConfig, {**to_dict(g), "interval_at": rule})
    s_over = {k: getattr(args, k, None) for k in ("method", "num_steps", "shift")}  # reproduce has no such flags
    s_over = {k: v for k, v in s_over.items() if v is not None}
    g_over = {k: getattr(args, k, None) for k in ("w_cfg", "cfg_interval", "w_ig", "ig_interval")
              if guidance_overrides}
    g_over = {k: list(v) if isinstance(v, list | tuple) else v for k, v in g_over.items() if v is not None}
    return (from_dict(SamplerConfig, {**to_dict(s), **s_over}),
            from_dict(GuidanceConfig, {**to_dict(g), **g_over}))


def sampling_precision() -> None:
    """TF32 matmuls and convolutions on CUDA while sampling, as the official samplers run their fp32 models."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def load_model(args) -> tuple[torch.nn.Module, dict]:
    """Build the model from --export or --checkpoint; returns (model in eval mode, JSON description)."""
    export = getattr(args, "export", None)
    if bool(export) == bool(args.checkpoint):
        raise ValueError("give exactly one of --export (igscale inference export) or --checkpoint (official .pt)")
    if export:
        from igscale.eval.export_io import load_export

        model = load_export(export)
        src = {"export": export}
    else:
        if not (args.model and args.checkpoint_kind):
            raise ValueError("--checkpoint needs --model (e.g. SiT-XL/2) and --checkpoint-kind (sit|lightningdit), "
                             "or a --preset that sets them")
        from igscale.eval.evaluate import fetch_local
        from igscale.models.convert import load_official_checkpoint

        preset = getattr(args, "preset", None)
        overrides = find_preset(preset).model_overrides if preset else {}
        with fetch_local(args.checkpoint) as path:  # an s3:// checkpoint is read from a temporary copy
            model = load_official_checkpoint(path, args.model, args.checkpoint_kind, **overrides)
        src = {"checkpoint": args.checkpoint, "checkpoint_kind": args.checkpoint_kind}
    # the content, not the URL: re-exporting other weights to the same URL must not extend an old sampling job
    return model.eval(), {"source": src, "model_config": to_dict(model.config), "weights_sha256": state_sha256(model)}


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), independent of the file format."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _latent_norm(args, channels: int):
    from igscale.latents.norm import LatentNorm

    if args.vae == "sd-vae":
        return LatentNorm.scalar(args.latent_scale), {"latent_norm": {"scale": args.latent_scale}}
    if not args.latent_stats:
        raise ValueError("--vae va-vae-f16d32 needs --latent-stats (the per-channel mean/std used in training)")
    from igscale.eval.evaluate import fetch_local

    with fetch_local(args.latent_stats) as path:
        if path.endswith(".json"):
            with open(path) as f:
                man = json.load(f)
            stats = man.get("latent_stats", man)
        else:
            stats = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        raise ValueError(f"{args.latent_stats}: expected latent stats with 'mean' and 'std'")
    mean = torch.as_tensor(stats["mean"], dtype=torch.float32).flatten()
    std = torch.as_tensor(stats["std"], dtype=torch.float32).flatten()
    if mean.numel() != channels or std.numel() != channels:  # stats of another VAE would broadcast or fail late
        raise ValueError(f"{args.latent_stats}: latent stats have {mean.numel()} mean / {std.numel()} std values, "
                         f"but {args.vae} latents have {channels} channels")
    import hashlib

    digest = hashlib.sha256(mean.numpy().tobytes() + std.numpy().tobytes()).hexdigest()
    return LatentNorm.per_channel(mean, std), {"latent_norm": {"stats": args.latent_stats, "sha256": digest}}


def build_decoder(args, device, *, latent_channels: int | None = None) -> tuple:
    """(decode(model latents) -> uint8 NHWC numpy, JSON description).

    latent_channels: the model's input channels; a VAE with other latent channels is refused (SD-VAE has 4,
    VA-VAE f16d32 32), since its decode would fail late or, through broadcasting, not at all.
    """
    if (args.vae or "none") == "none":
        return latents_to_uint8, {"vae": "none", "quantization": "127.5x+128 (latents)"}
    from igscale.vae import VAE_KINDS, build_vae, decode_to_uint8  # the latent pipeline's adapter around diffusers

    if not args.vae_weights:
        raise ValueError(f"--vae {args.vae} needs --vae-weights (a diffusers folder or LDM checkpoint; "
                         "igscale never downloads weights)")
    channels = VAE_KINDS[args.vae]["latent_channels"]
    if latent_channels is not None and latent_channels != channels:
        raise ValueError(f"the model takes {latent_channels}-channel latents but --vae {args.vae} has {channels} "
                         "latent channels; pair the model with the VAE it was trained on")
    quant = args.quantization or ("sit" if args.vae == "sd-vae" else "vavae")
    norm, norm_meta = _latent_norm(args, channels)
    vae = build_vae(args.vae, args.vae_weights, device=device)

    def decode(lat):
        return decode_to_uint8(vae, lat, quantization=quant, norm=norm).numpy()

    info = getattr(vae, "igscale_info", {})
    return decode, {"vae": args.vae, "vae_weights": args.vae_weights, "vae_sha256": info.get("weights_sha256"),
                    "quantization": quant, **norm_meta}


def load_scorer(url: str, device, allow_unverified: bool = False):
    """The FID Inception net; weights that are not the published file (only with --allow-unverified-weights) are
    announced on rank 0 and recorded as unverified by the caller."""
    from igscale.distributed.env import print0
    from igscale.eval.inception import load_inception

    inception = load_inception(url, device, allow_unverified=allow_unverified)
    if not inception.igscale_info["verified"]:
        print0(f"warning: {url} is not the published Inception file (sha256 {inception.igscale_info['sha256'][:16]}"
               "...): its metrics are not comparable to published ones and are recorded as unverified")
    return inception
