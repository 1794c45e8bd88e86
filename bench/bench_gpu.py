"""GPU performance benchmark (issue 8): igscale's fast training step vs an eager reference-style step, side by side.

    python bench/bench_gpu.py --out $OUT/bench_gpu.json                  # H100/H200: full table
    python bench/bench_gpu.py --device cpu --tiny --compile-backend aot_eager   # CPU smoke run of every code path

Both variants are built from the same weights and checked to agree (outputs and gradients, relative error < 1e-2 in
bf16) before timing. Timing uses CUDA events, warm-up, and the median of repeats. MFU is computed against the bf16
matmul rate measured in the same run. One table is printed; everything is also written as JSON.

reference: IGDiT with SDPA attention, eager (no compile), torch AdamW (for-loop), per-parameter EMA and clip loop.
fast:      IGDiT with FlashAttention (when installed; SDPA's flash kernel otherwise), per-block torch.compile
           (fused adaLN modulate/norm/gate), fused AdamW, foreach EMA (lerp) and foreach clip, TF32, no host syncs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from igscale.diffusion.losses import ig_loss  # noqa: E402
from igscale.models import build_model  # noqa: E402
from igscale.models.compile import compile_blocks  # noqa: E402
from igscale.models.flops import forward_flops_per_image, train_flops_per_image  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# EMA variants (tested against each other in tests/test_fast_paths.py)


def ema_update_reference(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    for e, p in zip(ema, params):
        e.mul_(decay).add_(p.detach().float(), alpha=1 - decay)


def ema_update_foreach(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_lerp_(ema, [p.detach().float() for p in params] if params[0].dtype != ema[0].dtype
                         else [p.detach() for p in params], 1 - decay)


# ---------------------------------------------------------------------------------------------------------------------
# timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device: torch.device, n: int, repeats: int = 20) -> float:
    """Measured dense bf16 matmul rate (the MFU denominator)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    s = time_fn(lambda: a @ b, device, warmup=5, repeats=repeats)
    return 2 * n**3 / s / 1e12


# ---------------------------------------------------------------------------------------------------------------------
# training step variants


class TrainStep:
    def __init__(self, model_name: str, kind: str, batch: int, device: torch.device, args, overrides: dict,
                 state: dict | None = None, checkpointing: bool = False):
        self.device, self.kind, self.batch = device, kind, batch
        backend = "sdpa" if kind == "reference" else "auto"
        torch.manual_seed(0)
        self.model = build_model(model_name, attn_backend=backend, **overrides).to(device)
        if state is not None:
            self.model.load_state_dict(state)
        self.model.train()
        self.model.set_activation_checkpointing(checkpointing)
        if kind == "fast":
            compile_blocks(self.model, backend=args.compile_backend, mode=args.compile_mode)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        cuda = device.type == "cuda"
        if kind == "fast":
            self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0, fused=cuda, foreach=None if cuda else True)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0, foreach=False)
        self.ema = [p.detach().float().clone() for p in self.params]
        cfg = self.model.config
        g = torch.Generator(device="cpu").manual_seed(1)
        C, H, W = cfg.latent_shape
        self.x0 = torch.randn(batch, C, H, W, generator=g).to(device)
        self.eps = torch.randn(batch, C, H, W, generator=g).to(device)
        self.y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
        self.t = torch.rand(batch, generator=g).to(device)
        self.mask = (torch.rand(batch, generator=g) < 0.1).to(device)
        self.amp_dtype = torch.bfloat16 if cuda else torch.bfloat16

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            terms = ig_loss(self.model.forward_heads, self.x0, self.y, self.t, self.eps, drop_mask=self.mask)
        return terms["loss"].mean()

    def step(self) -> None:
        self.loss().backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=self.kind == "fast")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.kind == "fast":
            ema_update_foreach(self.ema, self.params, 0.9999)
        else:
            ema_update_reference(self.ema, self.params, 0.9999)

    def grads(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        g = {n: p.grad.detach().float().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.opt.zero_grad(set_to_none=True)
        return loss.detach().float(), g


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def agreement(ref: TrainStep, fast: TrainStep) -> dict:
    l_r, g_r = ref.grads()
    l_f, g_f = fast.grads()
    worst = max(rel_err(g_f[n], g_r[n]) for n in g_r)
    with torch.no_grad(), torch.autocast(ref.device.type, dtype=ref.amp_dtype):
        ref.model.eval()
        fast.model.eval()
        o_r = ref.model(ref.x0, ref.t, ref.y)
        o_f = fast.model(ref.x0, ref.t, ref.y)
        ref.model.train()
        fast.model.train()
    return {"loss_rel": rel_err(l_f, l_r), "grad_rel_max": worst,
            "out_rel": max(rel_err(a, b) for a, b in zip(o_f, o_r)), "ok": worst < 1e-2}


def peak_mem_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def largest_batch(model_name, device, args, overrides, checkpointing: bool, limit: int) -> int:
    """Largest per-GPU batch (multiples of 32) whose fast training step fits in memory."""
    if device.type != "cuda":
        return -1
    best, b = 0, 32
    while b <= limit:
        try:
            s = TrainStep(model_name, "fast", b, device, args, overrides, checkpointing=checkpointing)
            s.step()
            sync(device)
            best = b
            del s
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        b = b * 2 if b < 256 else b + 128
    return best


# ---------------------------------------------------------------------------------------------------------------------
# sampling and precompute


def sampling_forward(model_name, device, args, overrides, batch: int) -> dict:
    torch.manual_seed(0)
    m = build_model(model_name, **overrides).to(device).eval()
    if args.compile_backend != "none":
        compile_blocks(m, backend=args.compile_backend, mode=args.compile_mode)
    C, H, W = m.config.latent_shape
    x, t = torch.randn(batch, C, H, W, device=device), torch.rand(batch, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def fwd():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            m(x, t, y)

    s = time_fn(fwd, device, args.warmup, args.repeats)
    return {"batch": batch, "s_per_nfe": s, "img_nfe_per_s": batch / s,
            "tflops": forward_flops_per_image(m.config) * batch / s / 1e12}


def vae_encode(device: torch.device, batch: int, size: int, args) -> dict:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return {"skipped": "diffusers not installed"}
    # SD-VAE (f8c4) architecture with random weights: throughput does not depend on the weight values
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=size).to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = vae.to(dtype)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)

    def enc():
        with torch.no_grad():
            vae.encode(x).latent_dist.mean  # noqa: B018

    s = time_fn(enc, device, max(1, args.warmup // 2), max(3, args.repeats // 2))
    return {"batch": batch, "size": size, "img_per_s": batch / s}


def cpu_decode_crop(size: int, n: int = 64) -> dict:
    """Per-core JPEG decode + ADM centre crop rate (the CPU side of precompute)."""
    import io

    import numpy as np
    from PIL import Image

    from igscale.data.crop import center_crop_adm

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()

    t0 = time.perf_counter()
    for _ in range(n):
        np.asarray(center_crop_adm(Image.open(io.BytesIO(data)).convert("RGB"), size))
    return {"img_per_s_per_core": n / (time.perf_counter() - t0), "source": "500x375 JPEG q90"}


# ---------------------------------------------------------------------------------------------------------------------
# scaling on paper


def scaling_estimate(params: int, step_s: float, batch: int, gpus_per_node: int = 8,
                     link_gbps: float = 400.0, nvlink_gbs: float = 450.0) -> dict:
    """Data-parallel scaling efficiency of ZeRO-1/2/3 from the measured step time and bytes moved per step.

    bf16 gradients (2 B/param). ZeRO-1/2: reduce-scatter + all-gather = 2·(N-1)/N·2P bytes per GPU per step.
    ZeRO-3 adds parameter all-gathers in forward and backward: 3·(N-1)/N·2P. Inter-node traffic on one 400 Gb/s link
    per GPU (rail-optimised), intra-node NVLink for 8 GPUs. 'no overlap' = t/(t+comm), 'overlap' = t/max(t, comm).
    """
    out = {}
    for n in (8, 32, 128):
        bw = nvlink_gbs * 1e9 if n <= gpus_per_node else link_gbps / 8 * 1e9
        for stage, factor in (("zero1", 2), ("zero2", 2), ("zero3", 3)):
            comm = factor * (n - 1) / n * 2 * params / bw
            out[f"{stage}@{n}"] = {"comm_s": comm, "eff_no_overlap": step_s / (step_s + comm),
                                   "eff_overlap": step_s / max(step_s, comm)}
    out["step_s"] = step_s
    out["batch"] = batch
    return out


# ---------------------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="SiT-XL/2,LightningDiT-XL/1")
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile-backend", default="inductor", help="inductor | aot_eager | none")
    ap.add_argument("--compile-mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--tiny", action="store_true", help="tiny models for a CPU smoke run")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: maxbatch,sampling,vae,scaling")
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_gpu.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    overrides = dict(input_size=8, hidden_size=64, depth=4, num_heads=2, ig_layers=(2,)) if args.tiny else {}
    if args.tiny:
        args.matmul_n = min(args.matmul_n, 512)
    peak = matmul_tflops(device, args.matmul_n)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "matmul_tflops": peak, "rows": []}
    print(f"device {info['device']}  torch {torch.__version__}  measured matmul {peak:.1f} TFLOP/s")
    hdr = f"{'model':<20}{'batch':>6}{'variant':>10}{'img/s':>9}{'MFU':>7}{'mem GiB':>9}{'ratio':>7}{'agree':>8}"
    print(hdr)
    for name in args.models.split(","):
        ov = dict(overrides)
        if args.tiny and name.startswith("LightningDiT"):
            ov.update(in_channels=8, patch_size=1)
        for batch in (int(b) for b in args.batches.split(",")):
            ref = TrainStep(name, "reference", batch, device, args, ov)
            fast = TrainStep(name, "fast", batch, device, args, ov, state=ref.model.state_dict())
            agree = agreement(ref, fast)
            res = {}
            for v in (ref, fast):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                s = time_fn(v.step, device, args.warmup, args.repeats)
                flops = train_flops_per_image(v.model.config) * batch / s
                res[v.kind] = {"s": s, "img_s": batch / s, "mfu": flops / (peak * 1e12), "mem": peak_mem_gib(device)}
            ratio = res["fast"]["img_s"] / res["reference"]["img_s"]
            for kind in ("reference", "fast"):
                r = res[kind]
                print(f"{name:<20}{batch:>6}{kind:>10}{r['img_s']:>9.1f}{100 * r['mfu']:>6.1f}%{r['mem']:>9.2f}"
                      f"{(ratio if kind == 'fast' else 1.0):>7.2f}{('ok' if agree['ok'] else 'FAIL'):>8}")
            row = {"model": name, "batch": batch, **{k: v for k, v in res.items()}, "ratio": ratio, "agreement": agree}
            if "scaling" not in skip:
                row["scaling"] = scaling_estimate(fast.model.num_params(), res["fast"]["s"], batch)
            info["rows"].append(row)
            del ref, fast
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "maxbatch" not in skip:
            limit = 8 if args.tiny else 1024
            info.setdefault("max_batch", {})[name] = {
                "no_ckpt": largest_batch(name, device, args, ov, False, limit),
                "ckpt": largest_batch(name, device, args, ov, True, limit)}
            print(f"{name}: largest batch without / with activation checkpointing: "
                  f"{info['max_batch'][name]['no_ckpt']} / {info['max_batch'][name]['ckpt']}")
        if "sampling" not in skip:
            sb = 8 if args.tiny else 256
            r = sampling_forward(name, device, args, ov, sb)
            r["mfu"] = r["tflops"] / peak
            info.setdefault("sampling", {})[name] = r
            print(f"{name}: sampling forward batch {sb}: {r['img_nfe_per_s']:.1f} img·NFE/s, MFU {100 * r['mfu']:.1f}%")
    if "vae" not in skip:
        size = 64 if args.tiny else 256
        info["vae_encode"] = vae_encode(device, 4 if args.tiny else 64, size, args)
        info["cpu_decode_crop"] = cpu_decode_crop(size if args.tiny else 256, n=8 if args.tiny else 64)
        v, c = info["vae_encode"], info["cpu_decode_crop"]
        if "img_per_s" in v:
            print(f"VAE encode {v['size']}px batch {v['batch']}: {v['img_per_s']:.1f} img/s; CPU decode+crop "
                  f"{c['img_per_s_per_core']:.1f} img/s/core -> {math.ceil(v['img_per_s'] / c['img_per_s_per_core'])} "
                  f"cores per GPU to keep up")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if all(r["agreement"]["ok"] for r in info["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
