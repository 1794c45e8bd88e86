"""VAE adapter: diffusers `AutoencoderKL` for SD-VAE (f8c4) and VA-VAE f16d32, weights from a local path or S3.

Accepted weight layouts (never a hub download):
  * diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` (or `.bin`) -- the SD-VAE release.
  * LDM single file (`.pt`/`.ckpt`/`.safetensors`, optionally under a "state_dict" key) with `encoder.down.*`,
    `decoder.up.*`, `quant_conv`, `post_quant_conv` keys -- the VA-VAE release and the original SD-VAE file.
    The architecture (ch, ch_mult, res blocks, attention levels, z channels) is read from the tensor shapes and
    the keys are mapped onto diffusers' class; levels with attention become Attn{Down,Up}*Block2D.

Latent conventions: `encode` returns the raw posterior (mean, std). `LatentNorm` maps raw latents to what the
diffusion model sees (SiT: z * 0.18215; LightningDiT: (z - mean_c) / std_c * multiplier) and back.
`decode_to_uint8` applies the per-codebase pixel quantisation (both official codebases truncate, never round).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any, Literal

import torch

from igscale.latents.norm import SD_SCALE, LatentNorm

__all__ = ["VAE_KINDS", "VAEError", "build_vae", "encode", "decode", "decode_to_uint8",
           "ldm_to_diffusers", "infer_ldm_config", "diffusers_config_from_ldm"]


class VAEError(ValueError):
    """Bad VAE weights / layout / kind."""


# Canonical architectures (diffusers AutoencoderKL kwargs) used for random-weight builds (benchmarks, tests).
VAE_KINDS: dict[str, dict[str, Any]] = {
    "sd-vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   scaling_factor=SD_SCALE, sample_size=256),
    "va-vae-f16d32": dict(block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2, latent_channels=32,
                          down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
                          up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
                          scaling_factor=1.0, sample_size=256),
}
# What identifies a kind when loading weights: (downsampling levels, latent channels).
_KIND_SIGNATURE = {"sd-vae": (4, 4), "va-vae-f16d32": (5, 32)}


# ---------------------------------------------------------------------------------------------- LDM layout
def infer_ldm_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read the LDM `ddconfig` (ch, ch_mult, num_res_blocks, attention levels, z) from tensor shapes."""
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise VAEError("LDM state dict has no contiguous encoder.down.<i> levels")
    nres = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    ch = sd["encoder.conv_in.weight"].shape[0]
    outs = [sd[f"encoder.down.{i}.block.{nres - 1}.conv2.weight"].shape[0] for i in levels]
    if any(o % ch for o in outs):
        raise VAEError(f"level channels {outs} are not multiples of ch={ch}")
    return dict(
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
        ch=ch, ch_mult=tuple(o // ch for o in outs), num_res_blocks=nres,
        attn_levels=tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd),
        z_channels=sd["post_quant_conv.weight"].shape[0],
        groups=32,
    )


def diffusers_config_from_ldm(c: dict[str, Any]) -> dict[str, Any]:
    n = len(c["ch_mult"])
    attn = set(c["attn_levels"])
    return dict(
        in_channels=c["in_channels"], out_channels=c["out_channels"], latent_channels=c["z_channels"],
        block_out_channels=tuple(c["ch"] * m for m in c["ch_mult"]), layers_per_block=c["num_res_blocks"],
        norm_num_groups=c["groups"],
        down_block_types=tuple("AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(n)),
        # diffusers orders decoder blocks from the lowest resolution up; LDM's decoder.up.<i> is indexed like the encoder
        up_block_types=tuple("AttnUpDecoderBlock2D" if (n - 1 - j) in attn else "UpDecoderBlock2D" for j in range(n)),
    )


_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _map_key(k: str, n_levels: int) -> str | None:
    """LDM key -> diffusers key (None for keys that are not part of the autoencoder)."""
    if k.startswith(("quant_conv.", "post_quant_conv.")):
        return k
    m = re.match(r"(encoder|decoder)\.(.*)$", k)
    if not m:
        return None
    side, rest = m.groups()
    rules = [
        (r"conv_in\.(.*)", lambda g: f"conv_in.{g[0]}"),
        (r"conv_out\.(.*)", lambda g: f"conv_out.{g[0]}"),
        (r"norm_out\.(.*)", lambda g: f"conv_norm_out.{g[0]}"),
        (r"mid\.block_(\d)\.(\w+)\.(.*)", lambda g: f"mid_block.resnets.{int(g[0]) - 1}.{_RESNET[g[1]]}.{g[2]}"),
        (r"mid\.attn_1\.(\w+)\.(.*)", lambda g: f"mid_block.attentions.0.{_ATTN[g[0]]}.{g[1]}"),
        (r"down\.(\d+)\.block\.(\d+)\.(\w+)\.(.*)",
         lambda g: f"down_blocks.{g[0]}.resnets.{g[1]}.{_RESNET[g[2]]}.{g[3]}"),
        (r"down\.(\d+)\.attn\.(\d+)\.(\w+)\.(.*)",
         lambda g: f"down_blocks.{g[0]}.attentions.{g[1]}.{_ATTN[g[2]]}.{g[3]}"),
        (r"down\.(\d+)\.downsample\.conv\.(.*)", lambda g: f"down_blocks.{g[0]}.downsamplers.0.conv.{g[1]}"),
        (r"up\.(\d+)\.block\.(\d+)\.(\w+)\.(.*)",
         lambda g: f"up_blocks.{n_levels - 1 - int(g[0])}.resnets.{g[1]}.{_RESNET[g[2]]}.{g[3]}"),
        (r"up\.(\d+)\.attn\.(\d+)\.(\w+)\.(.*)",
         lambda g: f"up_blocks.{n_levels - 1 - int(g[0])}.attentions.{g[1]}.{_ATTN[g[2]]}.{g[3]}"),
        (r"up\.(\d+)\.upsample\.conv\.(.*)",
         lambda g: f"up_blocks.{n_levels - 1 - int(g[0])}.upsamplers.0.conv.{g[1]}"),
    ]
    for pat, fn in rules:
        mm = re.fullmatch(pat, rest)
        if mm:
            return f"{side}.{fn(mm.groups())}"
    raise VAEError(f"unmapped LDM autoencoder key {k!r}")


def ldm_to_diffusers(sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert an LDM-layout KL autoencoder state dict. Returns (diffusers config kwargs, diffusers state dict).
    Non-autoencoder keys (loss.*, foundation-model projections, EMA copies...) are dropped."""
    cfg = infer_ldm_config(sd)
    n = len(cfg["ch_mult"])
    out = {}
    for k, v in sd.items():
        nk = _map_key(k, n)
        if nk is None:
            continue
        if re.search(r"attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", nk) and v.ndim == 4:
            v = v[:, :, 0, 0]  # LDM uses 1x1 convs for q/k/v/proj, diffusers uses Linear
        out[nk] = v
    return diffusers_config_from_ldm(cfg), out


# ---------------------------------------------------------------------------------------------- loading
def _is_ldm(sd: dict) -> bool:
    return any(k.startswith("encoder.down.") for k in sd) and "post_quant_conv.weight" in sd


def _is_diffusers(sd: dict) -> bool:
    return any(k.startswith("encoder.down_blocks.") for k in sd)


def _layout_summary(sd: dict) -> str:
    prefixes = sorted({".".join(k.split(".")[:2]) for k in sd})
    return f"{len(sd)} tensors, key prefixes {prefixes[:20]}{' ...' if len(prefixes) > 20 else ''}"


def _load_state_dict(data: bytes, name: str) -> dict[str, torch.Tensor]:
    if name.endswith(".safetensors"):
        from safetensors.torch import load

        sd = load(data)
    else:
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise VAEError(f"{name}: cannot read as a torch checkpoint ({e})") from e
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise VAEError(f"{name}: expected a state dict, found {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _read_weights(weights: str) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor], str]:
    """Returns (diffusers config or None, state dict, sha256 of the weight bytes)."""
    from igscale.storage import open_storage, split_url

    root = open_storage(weights)
    files = root.list() if (weights.startswith("s3://") or not weights.endswith(
        (".pt", ".ckpt", ".pth", ".bin", ".safetensors"))) else []
    if "config.json" in files:
        cfg = json.loads(root.get_text("config.json"))
        for fname in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if fname in files:
                data = root.get_bytes(fname)
                return cfg, _load_state_dict(data, fname), hashlib.sha256(data).hexdigest()
        raise VAEError(f"{weights}: diffusers folder without diffusion_pytorch_model.safetensors/.bin "
                       f"(found {files})")
    store, key = split_url(weights)
    try:
        data = store.get_bytes(key)
    except FileNotFoundError as e:
        raise VAEError(f"VAE weights not found: {weights}") from e
    return None, _load_state_dict(data, key), hashlib.sha256(data).hexdigest()


def build_vae(kind: Literal["sd-vae", "va-vae-f16d32"], weights: str | None = None, *,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build the diffusers AutoencoderKL for `kind` in eval mode.

    weights: local path or s3:// URL of a diffusers folder or an LDM-layout checkpoint file; None builds the
    canonical architecture with random weights (benchmarks, tests). The result carries `vae.igscale_info`
    (kind, weights URL, sha256, config) for dataset manifests.
    """
    from diffusers import AutoencoderKL

    if kind not in VAE_KINDS:
        raise VAEError(f"unknown VAE kind {kind!r}; expected one of {sorted(VAE_KINDS)}")
    if weights is None:
        cfg, sd, sha = dict(VAE_KINDS[kind]), None, None
    else:
        cfg, sd, sha = _read_weights(weights)
        if cfg is None:
            if _is_ldm(sd):
                cfg, sd = ldm_to_diffusers(sd)
            elif _is_diffusers(sd):
                raise VAEError(f"{weights}: diffusers-layout tensors without a config.json; pass the folder")
            else:
                raise VAEError(f"{weights}: unknown VAE layout (expected LDM encoder.down.* / decoder.up.* / "
                               f"quant_conv keys or a diffusers folder); found {_layout_summary(sd)}")
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        got = (len(cfg["block_out_channels"]), cfg["latent_channels"])
        if got != _KIND_SIGNATURE[kind]:
            raise VAEError(f"{weights}: weights have {got[0]} levels and {got[1]} latent channels, but kind "
                           f"{kind!r} needs {_KIND_SIGNATURE[kind]}")
        cfg.setdefault("scaling_factor", VAE_KINDS[kind]["scaling_factor"])
    vae = AutoencoderKL(**cfg)
    if sd is not None:
        missing, unexpected = vae.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise VAEError(f"{weights}: weights do not fit the {kind} architecture: missing {missing[:8]} "
                           f"(+{max(0, len(missing) - 8)}), unexpected {unexpected[:8]}")
    vae.eval().requires_grad_(False).to(device=device)
    if dtype != torch.float32:
        vae.to(dtype=dtype)
    vae.igscale_info = {"kind": kind, "weights": weights, "weights_sha256": sha,
                        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vae.config.items()
                                   if not k.startswith("_")}}
    return vae


# ---------------------------------------------------------------------------------------------- encode / decode
def to_model_pixels(pixels: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B,H,W,3) or (B,3,H,W) in [0,255] -> float (B,3,H,W) in [-1,1]; float input is taken as [-1,1]."""
    x = torch.as_tensor(pixels)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected a (B,H,W,3) or (B,3,H,W) image batch, got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 127.5 - 1.0
    return x.to(device=device, dtype=dtype)


@torch.no_grad()
def encode(vae: torch.nn.Module, pixels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std), each (B, C, H/f, W/f) float32 on the VAE's device."""
    p = next(vae.parameters())
    dist = vae.encode(to_model_pixels(pixels, p.device, p.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, norm: LatentNorm | None = None) -> torch.Tensor:
    """Model latents (B,C,h,w) -> pixels (B,3,H,W) in about [-1,1] (float32)."""
    p = next(vae.parameters())
    z = latents.to(device=p.device, dtype=torch.float32)
    if norm is not None:
        z = norm.denormalize(z)
    return vae.decode(z.to(p.dtype)).sample.float()


def quantize(x: torch.Tensor, quantization: Literal["sit", "vavae"] = "sit") -> torch.Tensor:
    """(B,3,H,W) float in [-1,1] -> (B,H,W,3) uint8. Both recipes truncate (no rounding)."""
    if quantization == "sit":
        y = 255.0 * (x + 1.0) / 2.0
    elif quantization == "vavae":
        y = 127.5 * x + 128.0
    else:
        raise ValueError(f"quantization must be 'sit' or 'vavae', got {quantization!r}")
    return y.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def decode_to_uint8(vae: torch.nn.Module, latents: torch.Tensor, *, quantization: Literal["sit", "vavae"] = "sit",
                    norm: LatentNorm | None = None) -> torch.Tensor:
    """Latents (B,C,h,w) -> uint8 images (B,H,W,3) on CPU. `norm`: undo the training normalisation first
    (None: the latents are raw VAE latents)."""
    return quantize(decode(vae, latents, norm), quantization)
