"""Sampling throughput on one device: IG-only vs CFG+IG (and CFG+IG with the SiT guidance interval), one run.

IG needs no extra network evaluation (D_i and D_f come from one forward pass); CFG doubles the batch rows wherever
it is active. The script reports img/s, img·NFE/s (images x sampler NFE per second) and model rows evaluated per
sample per step, interleaving the settings over repeats and taking medians so load drift hits all of them alike.

  python bench/bench_sampling.py                      # small CPU model
  python bench/bench_sampling.py --model SiT-XL/2 --size 32 --batch 64 --steps 20 --device cuda

--modes instead compares `igscale sample`'s default path, its batch-invariant path and plain batched kernels on the
same weights and settings (model sampling, SD-VAE decode, end to end; see compare_modes):

  python bench/bench_sampling.py --modes --model SiT-XL/2 --size 32 --hidden 0 --depth 0 --batch 64 --steps 4 \
      --device cuda --peak-tflops 989 --json modes.json
  python bench/bench_sampling.py --modes --tiny       # CPU smoke run (seconds)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from igscale.core.typed import to_dict
from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.noise import per_sample_randn
from igscale.diffusion.samplers import SamplerConfig, sample
from igscale.eval.generate import GenerationConfig, decode_batch
from igscale.models import build_model
from igscale.models.flops import forward_flops_per_image
from igscale.ops.linear import batch_invariant

SETTINGS = {
    "no guidance": GuidanceConfig(),
    "IG only (w_ig 1.4)": GuidanceConfig(w_ig=1.4),
    "CFG+IG (w_cfg 1.5 on [0,1], w_ig 1.4)": GuidanceConfig(w_cfg=1.5, w_ig=1.4),
    "CFG+IG (w_cfg 1.35 on [0,0.7], w_ig 1.4)": GuidanceConfig(w_cfg=1.35, cfg_interval=(0.0, 0.7), w_ig=1.4),
}


TINY_MODEL = dict(input_size=8, hidden_size=64, depth=2, num_heads=2, ig_layers=(1,))
TINY_VAE = dict(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, layers_per_block=1)
VAE_BY_CHANNELS = {4: "sd-vae", 32: "va-vae-f16d32"}


class _Clock:
    """CUDA events on a GPU (no host sync inside the timed region), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, a, b) -> float:
        if not self.cuda:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1e3


def _build_decoder(in_channels: int, device: torch.device, tiny: bool):
    """decode(latents) -> uint8 NHWC, as igscale.eval.setup.build_decoder does for a random-weight VAE of the kind
    that fits the model's latent channels; (None, note) when it cannot be built."""
    kind = VAE_BY_CHANNELS.get(in_channels)
    if kind is None:
        return None, {"skipped": f"no VAE kind with {in_channels} latent channels"}
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return None, {"skipped": "diffusers not installed"}
    from igscale.latents.norm import LatentNorm
    from igscale.vae import VAE_KINDS, build_vae, decode_to_uint8

    if tiny:
        torch.manual_seed(0)
        vae = AutoencoderKL(**dict(VAE_KINDS[kind], **TINY_VAE)).eval().requires_grad_(False).to(device)
    else:  # the real architecture; throughput does not depend on the weight values
        vae = build_vae(kind, None, device=device)
    quant = "sit" if kind == "sd-vae" else "vavae"
    norm = LatentNorm.scalar() if kind == "sd-vae" else LatentNorm(torch.zeros(in_channels), torch.ones(in_channels))

    def decode(lat):
        return decode_to_uint8(vae, lat, quantization=quant, norm=norm).numpy()

    return decode, {"kind": kind, "tiny": tiny, "dtype": "float32", "quantization": quant}


@torch.no_grad()
def compare_modes(model_name: str, device: torch.device | str, batch: int, *, overrides: dict | None = None,
                  steps: int = 4, repeats: int = 3, vae: bool = True, tiny: bool = False,
                  peak_tflops: float | None = None, method: str = "euler", tf32: bool = True,
                  guidance: GuidanceConfig | None = None) -> dict:
    """One batch through `igscale sample`'s default path, its batch-invariant path and plain batched kernels.

    Same weights, noise, labels and settings for all three; each mode runs `sample` inside `batch_invariant(...)`
    and `decode_batch` exactly as generate.py does. The modes are interleaved over `repeats` (medians) so load drift
    hits all alike. Returns per-mode throughput (img·NFE/s of the sampler, VAE img/s, end-to-end img/s, achieved
    forward TFLOP/s and MFU when `peak_tflops` is given) and the ratios default/plain and invariant/plain.
    tf32: as `igscale sample`, which enables TF32 on CUDA (fp32 model and VAE).
    """
    device = torch.device(device)
    over = {**(TINY_MODEL if tiny else {}), **(overrides or {})}
    model = build_model(model_name, **over).to(device).eval()
    c = model.config
    sampler = SamplerConfig(method=method, num_steps=steps)
    guidance = guidance or GuidanceConfig(w_cfg=1.35, cfg_interval=(0.0, 0.7), w_ig=1.4)
    seeds = list(range(batch))
    noise = per_sample_randn(seeds, c.latent_shape, device=device)
    y = torch.arange(batch, device=device) % c.num_classes
    decode, vae_info = _build_decoder(c.in_channels, device, tiny) if vae else (None, {"skipped": "vae=False"})
    default_inv = GenerationConfig().batch_invariant
    modes = {"default": default_inv, "batch_invariant": True, "plain": False}
    clock = _Clock(device)

    def run(inv: bool, plain: bool) -> tuple[float, float, dict]:
        t0 = clock.mark()
        if plain:  # no batch_invariant context at all: the training / benchmark kernels
            lat, st = sample(model, noise, y, sampler, guidance, null_class=c.num_classes, seeds=seeds,
                             return_stats=True)
        else:
            with batch_invariant(inv):
                lat, st = sample(model, noise, y, sampler, guidance, null_class=c.num_classes, seeds=seeds,
                                 return_stats=True)
        t1 = clock.mark()
        if decode is not None:
            decode_batch(decode, lat, inv)  # returns host arrays: the decode is complete
        t2 = clock.mark()
        return clock.seconds(t0, t1), clock.seconds(t1, t2), st

    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        for m, inv in modes.items():  # warm-up: kernel selection, allocator, lazy init
            run(inv, m == "plain")
        times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        stats: dict[str, dict] = {}
        for _ in range(repeats):
            for m, inv in modes.items():
                ts, td, stats[m] = run(inv, m == "plain")
                times[m].append((ts, td))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    flops = forward_flops_per_image(c)
    res: dict = {}
    for m in modes:
        ts = statistics.median(t for t, _ in times[m])
        td = statistics.median(t for _, t in times[m]) if decode is not None else 0.0
        tflops = stats[m]["rows_per_sample"] * batch * flops / ts / 1e12
        res[m] = {"batch_invariant": modes[m], "sample_s": ts, "img_nfe_per_s": batch * sampler.nfe() / ts,
                  "decode_s": td if decode is not None else None,
                  "vae_img_per_s": batch / td if decode is not None else None,
                  "img_per_s": batch / (ts + td), "forward_tflops": tflops,
                  "mfu": tflops / peak_tflops if peak_tflops else None}
    ratios = {}
    for name, m in (("default/plain", "default"), ("invariant/plain", "batch_invariant")):
        ratios[name] = res[m]["img_per_s"] / res["plain"]["img_per_s"]  # end to end, what a sampling job sees
        ratios[f"sampling {name}"] = res[m]["img_nfe_per_s"] / res["plain"]["img_nfe_per_s"]
        if decode is not None:
            ratios[f"vae {name}"] = res[m]["vae_img_per_s"] / res["plain"]["vae_img_per_s"]
    return {"model": model_name, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in over.items()},
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch": batch, "sampler": to_dict(sampler), "nfe": sampler.nfe(), "guidance": to_dict(guidance),
            "tf32": tf32, "repeats": repeats, "forward_gflop_per_image": flops / 1e9, "peak_tflops": peak_tflops,
            "default_mode": "batch_invariant" if default_inv else "plain", "vae": vae_info, "modes": res,
            "ratios": ratios, "default_meets_0.9x": ratios["default/plain"] >= 0.9}


def print_modes(r: dict) -> None:
    print(f"model {r['model']} {r['overrides']} ({r['params_M']:.1f}M params), batch {r['batch']}, "
          f"{r['sampler']['method']} {r['sampler']['num_steps']} steps (NFE {r['nfe']}), {r['device_name']}, "
          f"TF32 {r['tf32']}, VAE {r['vae']}, median of {r['repeats']}; default mode = {r['default_mode']}")
    print("| mode | img·NFE/s | VAE img/s | end-to-end img/s | forward TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for m, v in r["modes"].items():
        vae = "-" if v["vae_img_per_s"] is None else f"{v['vae_img_per_s']:.2f}"
        mfu = "-" if v["mfu"] is None else f"{100 * v['mfu']:.1f}%"
        print(f"| {m} | {v['img_nfe_per_s']:.1f} | {vae} | {v['img_per_s']:.2f} | {v['forward_tflops']:.2f} | {mfu} |")
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items() if math.isfinite(v)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SiT-S/2")
    p.add_argument("--size", type=int, default=16, help="latent input size")
    p.add_argument("--hidden", type=int, default=256, help="override hidden size (0 = model default)")
    p.add_argument("--depth", type=int, default=8, help="override depth (0 = model default)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is robust on a shared machine)")
    g = p.add_argument_group("--modes: default vs batch-invariant vs plain kernels (compare_modes)")
    g.add_argument("--modes", action="store_true", help="compare the sampling modes instead of guidance settings")
    g.add_argument("--tiny", action="store_true", help="tiny model and VAE (CPU smoke run; ignores size overrides)")
    g.add_argument("--no-vae", action="store_true", help="model sampling only")
    g.add_argument("--peak-tflops", type=float, default=None, help="measured peak TFLOP/s of the device, for MFU")
    g.add_argument("--json", default=None, help="also write the result as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    over = {"input_size": args.size, "ig_layers": (max(1, (args.depth or 28) // 2),)}
    if args.hidden:
        over.update(hidden_size=args.hidden, num_heads=args.heads)
    if args.depth:
        over.update(depth=args.depth)
    if args.modes:
        if not args.depth:  # the registry model's own IG layer (e.g. block 8 of XL/2)
            over.pop("ig_layers")
        r = compare_modes(args.model, args.device, args.batch, overrides=None if args.tiny else over,
                          steps=args.steps, repeats=args.repeats, vae=not args.no_vae, tiny=args.tiny,
                          peak_tflops=args.peak_tflops)
        print_modes(r)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=2)
        return
    model = build_model(args.model, **over).to(args.device).eval()
    c = model.config
    seeds = list(range(args.batch))
    noise = per_sample_randn(seeds, (c.in_channels, c.input_size, c.input_size), device=args.device)
    y = torch.arange(args.batch, device=args.device) % c.num_classes
    sampler = SamplerConfig(method="euler", num_steps=args.steps)

    def run(g):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, st = sample(model, noise, y, sampler, g, null_class=c.num_classes, seeds=seeds, return_stats=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, st

    run(SETTINGS["no guidance"])  # warm-up
    times = {k: [] for k in SETTINGS}
    stats = {}
    for _ in range(args.repeats):
        for k, g in SETTINGS.items():
            dt, stats[k] = run(g)
            times[k].append(dt)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model {args.model} overrides {over} ({params:.1f}M params), batch {args.batch}, Euler {args.steps} steps "
          f"(NFE {sampler.nfe()}), device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print("| setting | s/batch | img/s | img·NFE/s | model rows per sample per step | time vs IG only |")
    print("|---|---|---|---|---|---|")
    ig = statistics.median(times["IG only (w_ig 1.4)"])
    for k in SETTINGS:
        t = statistics.median(times[k])
        rows = stats[k]["rows_per_sample"] / args.steps
        print(f"| {k} | {t:.3f} | {args.batch / t:.1f} | {args.batch * sampler.nfe() / t:.1f} | {rows:.2f} | "
              f"{t / ig:.2f}x |")


if __name__ == "__main__":
    main()
