"""GPU performance benchmark: the training step `igscale train` runs vs an eager reference-style step, side by side.

What is compared, and why: a throughput figure should describe code users run, so the "igscale" rows time exactly
the trainer's step (bench/gpu_steps.py: IgscaleStep): a RunConfig loaded from configs/sit_xl2_ig.yaml or
configs/lightningdit_xl1_ig.yaml, the model, activation checkpointing and `model.compile` built as
igscale/cli/train.py builds them, igscale's DeepSpeedEngine (ZeRO-2 and ZeRO-0 rows), and the trainer's loop order
(launch step j, read step j-1's flags and queue its EMA update, then queue step j's optimizer update). The
"reference" rows are the official trainers' structure on the same IGDiT class: SDPA attention, no compile, fp32
weights under bf16 autocast, for-loop AdamW, per-tensor clip_grad_norm_ and a per-tensor EMA loop. The LightningDiT
config trains with Muon, which is valid at ZeRO-0 only: its ZeRO-2 row uses adamw (the table names each row's
optimizer). Every row is measured in the same run, one after another, on the same weights and inputs.

Before timing, one step of each igscale row is checked against the reference from the same weights and randomness
(draw_step_randomness): loss relative error and the global gradient relative error ||g_a - g_b|| / ||g_b|| (the
igscale gradients read from the DeepSpeed engine after backward, before the optimizer step) must both be below
--tol (1e-2), or the script exits 1. bf16 weights and activations (precision bf16, the SiT config) sit near that
limit at full width and depth: a CPU run at width 768, depth 28 measured 9.6e-3. Timing: wall clock of windows of
back-to-back steps between device syncs, after warm-up windows; median over windows. MFU = train FLOPs/image x
img/s / the matmul rate measured in this run.

    python bench/bench_gpu.py --out $OUT/bench_gpu.json        # GPU (H100/H200): full table (aimed at ~4 min)
    python bench/bench_gpu.py --device cpu --tiny                # CPU smoke run of every code path (~1 min)

Also: the largest per-GPU batch of the igscale ZeRO-2 step with and without activation checkpointing (CUDA only),
sampling throughput and MFU at batch 256 (bench/bench_sampling.py: compare_modes, default and batch-invariant modes),
VAE encode and CPU JPEG decode + crop rates, and a ZeRO data-parallel scaling estimate from the measured step time.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.gpu_steps import (  # noqa: E402
    IgscaleStep,
    ReferenceStep,
    agreement,
    allocated,
    ensure_group,
    free_memory,
    initial_state,
    matmul_tflops,
    peak_mem_gib,
    reset_peak,
    run_config,
    sync,
    time_steps,
)
from igscale.models.flops import forward_flops_per_image, train_flops_per_image  # noqa: E402

MAX_BATCH_SIZES = (128, 256, 384, 512)


# ---------------------------------------------------------------------------------------------------------------------
# training rows


def bench_batch(name: str, batch: int, device: torch.device, args, peak: float, state: dict) -> list[dict]:
    """reference, igscale ZeRO-2, igscale ZeRO-0 for one model and per-GPU batch, all from the weights `state`."""
    cfgs = {z: run_config(name, batch, z, tiny=args.tiny, backend=args.compile_backend) for z in (2, 0)}
    rows, ref_grads, ref_loss, ref_s = [], None, None, None
    for kind, zero in (("reference", None), ("igscale", 2), ("igscale", 0)):
        cfg = cfgs[zero if zero is not None else 0]
        base = allocated(device)  # what earlier rows left (nothing, if they were freed cleanly)
        t0 = time.perf_counter()
        step = (ReferenceStep if kind == "reference" else IgscaleStep)(cfg, device, state)
        loss, grads = step.loss_and_grads()  # step 0: compile and warm-up happen here
        sync(device)
        first_s = time.perf_counter() - t0
        if kind == "reference":
            ref_loss, ref_grads, agree = loss, grads, None
        else:
            agree = agreement(loss, grads, ref_loss, ref_grads, tol=args.tol)
        del grads
        free_memory(device)
        reset_peak(device)  # from here on: weights, optimizer state, EMA and the steps' own activations
        t = time_steps(step, device, args.steps_per_window, args.warmup, args.repeats)
        s = t["s_per_step"]
        mc = step.model_config
        row = {"model": name, "batch": batch, **step.info, "compiled_graphs": step.compiled_graphs(),
               **t, "build_and_first_step_s": first_s, "img_s": batch / s,
               "mfu": train_flops_per_image(mc) * batch / s / (peak * 1e12), "mem_gib": peak_mem_gib(device, base),
               "ratio_vs_reference": 1.0 if kind == "reference" else ref_s / s, "agreement": agree}
        if kind == "reference":
            ref_s = s
        if zero == 2 and "scaling" not in args.skip:
            row["scaling"] = scaling_estimate(row["trainable_params"], s, batch)
        step.close()
        del step
        free_memory(device)
        row["left_after_close_gib"] = (allocated(device) - base) / 2**30 if device.type == "cuda" else 0.0
        rows.append(row)
        print_row(row)
    del ref_grads
    free_memory(device)
    return rows


HEADER = (f"{'model':<18}{'batch':>6} {'variant':<12}{'optimizer':<22}{'compile':<9}{'img/s':>9}{'MFU':>7}"
          f"{'mem GiB':>9}{'ratio':>7}  agreement (loss / grad rel. err.)")


def print_row(r: dict) -> None:
    v = r["variant"] + ("" if r["zero_stage"] is None else f" z{r['zero_stage']}")
    a = r["agreement"]
    agree = "reference" if a is None else (f"{'ok' if a['ok'] else 'FAIL'} {a.get('loss_rel', float('nan')):.1e} / "
                                            f"{a.get('grad_rel', float('nan')):.1e}")
    comp = r["compile"] + ("" if r["compile_backend"] in (None, "inductor") else f"/{r['compile_backend'][:3]}")
    print(f"{r['model']:<18}{r['batch']:>6} {v:<12}{r['optimizer']:<22}{comp:<9}{r['img_s']:>9.1f}"
          f"{100 * r['mfu']:>6.1f}%{r['mem_gib']:>9.2f}{r['ratio_vs_reference']:>7.2f}  {agree}", flush=True)


def largest_batch(name: str, device: torch.device, args, ckpt: bool, sizes: list[int], start: int = 0,
                  predict=None) -> dict:
    """Largest of `sizes` (ascending, coarse) at which two igscale ZeRO-2 steps run without running out of memory.

    Memory grows with the batch, so the search tries sizes[start] first, then walks up until a size fails (skipping,
    as not tried, a size that `predict(batch) -> GiB` puts above the device's memory) or down until one fits. Each
    trial is a fresh engine and compile, so a good `start` (from the rows' peak memory) keeps it to one or two."""
    trials, total = [], torch.cuda.get_device_properties(device).total_memory / 2**30

    def fits(b: int) -> bool:
        if predict is not None and predict(b) > total:
            trials.append({"batch": b, "fits": False, "tried": False, "predicted_gib": predict(b)})
            return False
        step, oom, base = None, False, allocated(device)
        reset_peak(device)
        try:
            step = IgscaleStep(run_config(name, b, 2, tiny=args.tiny, ckpt=ckpt, backend=args.compile_backend), device)
            step.step()
            step.step()
            step.drain()
            sync(device)
        except torch.OutOfMemoryError:
            oom = True
        trials.append({"batch": b, "fits": not oom, "tried": True, "peak_gib": peak_mem_gib(device, base)})
        if step is not None:
            step.close()
        del step
        free_memory(device)
        return not oom

    best, i = 0, min(start, len(sizes) - 1)
    if sizes and fits(sizes[i]):
        while i + 1 < len(sizes) and fits(sizes[i + 1]):
            i += 1
        best = sizes[i]
    else:
        best = next((sizes[j] for j in range(i - 1, -1, -1) if fits(sizes[j])), 0)
    return {"largest": best, "capped": bool(sizes) and best == sizes[-1], "trials": trials}


def memory_line(rows: list[dict], name: str):
    """GiB(batch) from a straight line through the igscale ZeRO-2 rows' peak memory (None without two batches)."""
    pts = sorted({(r["batch"], r["mem_gib"]) for r in rows if r["model"] == name and r["zero_stage"] == 2})
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return None
    (b0, m0), (b1, m1) = pts[0], pts[-1]
    k = max((m1 - m0) / (b1 - b0), 1e-6)
    return lambda b: m0 + k * (b - b0)


# ---------------------------------------------------------------------------------------------------------------------
# sampling, precompute, scaling


def sampling(name: str, device: torch.device, args, peak: float) -> dict:
    cfg = run_config(name, 8, 2, tiny=args.tiny, backend=args.compile_backend)
    batch = 8 if args.tiny else 256
    try:
        from bench.bench_sampling import compare_modes
    except ImportError as e:  # another engineer's helper; older checkouts lack it
        r = sampling_forward(cfg, device, args, batch)
        r["note"] = f"bench_sampling.compare_modes unavailable ({e}); compiled bf16 forward timed instead"
    else:
        r = compare_modes(cfg.model.name, device, batch, overrides=cfg.model.arch_overrides(), steps=2,
                          repeats=args.repeats, vae=False, peak_tflops=peak)
    free_memory(device)
    return r


def sampling_forward(cfg, device: torch.device, args, batch: int) -> dict:
    """Fallback: the forward pass alone (bf16 autocast, compiled as the config resolves), img·NFE/s and MFU."""
    from igscale.models import build_model
    from igscale.models.compile import apply_compile, resolve_compile_mode

    torch.manual_seed(0)
    m = build_model(cfg.model.name, **cfg.model.arch_overrides()).to(device).eval()
    apply_compile(m, resolve_compile_mode(cfg.model.compile, device.type), backend=cfg.model.compile_backend)
    c = m.config
    x, t = torch.randn(batch, *c.latent_shape, device=device), torch.rand(batch, device=device)
    y = torch.randint(0, c.num_classes, (batch,), device=device)

    class Fwd:
        def step(self):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                m(x, t, y)

        def drain(self):
            pass

    s = time_steps(Fwd(), device, args.steps_per_window, args.warmup, args.repeats)["s_per_step"]
    tflops = forward_flops_per_image(c) * batch / s / 1e12
    return {"batch": batch, "s_per_nfe": s, "img_nfe_per_s": batch / s, "forward_tflops": tflops}


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

    class Enc:
        def step(self):
            with torch.no_grad():
                vae.encode(x).latent_dist.mean  # noqa: B018

        def drain(self):
            pass

    s = time_steps(Enc(), device, 1, 1, max(2, args.repeats))["s_per_step"]
    return {"batch": batch, "size": size, "img_per_s": batch / s}


def cpu_decode_crop(size: int, n: int = 64) -> dict:
    """Per-core JPEG decode + ADM centre crop rate (the CPU side of precompute)."""
    import numpy as np
    from PIL import Image

    from data_pipeline.crop import center_crop_adm

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    t0 = time.perf_counter()
    for _ in range(n):
        np.asarray(center_crop_adm(Image.open(io.BytesIO(data)).convert("RGB"), size))
    return {"img_per_s_per_core": n / (time.perf_counter() - t0), "source": "500x375 JPEG q90"}


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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="SiT-XL/2,LightningDiT-XL/1")
    ap.add_argument("--batches", default=None, help="per-GPU batches (default 32,128; --tiny: 4)")
    ap.add_argument("--steps-per-window", type=int, default=None, help="steps per timed window (default 5; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up windows after the agreement step, which already compiled (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed windows, median taken (default 3; tiny 2)")
    ap.add_argument("--tiny", action="store_true", help="tiny models, compile=blocks with aot_eager: CPU smoke run")
    ap.add_argument("--compile-backend", default=None,
                    help="override model.compile_backend of the igscale rows (default: the config's; --tiny aot_eager)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: maxbatch,sampling,vae,scaling")
    ap.add_argument("--tol", type=float, default=1e-2, help="agreement limit for loss and global gradient rel. error")
    ap.add_argument("--matmul-n", type=int, default=None, help="matmul size for the peak rate (8192; CPU 256)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_gpu.json"))
    args = ap.parse_args(argv)
    small = args.tiny
    args.batches = [int(b) for b in (args.batches or ("4" if small else "32,128")).split(",")]
    args.steps_per_window = args.steps_per_window or (2 if small else 5)
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = args.repeats or (2 if small else 3)
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def write(path: str, info: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    owns_group = ensure_group(device)
    import deepspeed

    if device.type == "cuda":  # the official trainers and igscale (engine.tf32) both enable TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = matmul_tflops(device, args.matmul_n or (8192 if device.type == "cuda" else 256))
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "matmul_tflops": peak,
            "matmul_dtype": "bfloat16" if device.type == "cuda" else "float32", "tiny": args.tiny,
            "timing": {"steps_per_window": args.steps_per_window, "warmup_windows": args.warmup,
                       "windows": args.repeats}, "complete": False, "rows": []}
    print(f"device {info['device']}  torch {torch.__version__}  deepspeed {deepspeed.__version__}  measured matmul "
          f"{peak:.2f} TFLOP/s ({info['matmul_dtype']})")
    print(HEADER)
    t_start = time.perf_counter()
    try:
        for name in args.models.split(","):
            state = initial_state(run_config(name, args.batches[0], 2, tiny=args.tiny))  # on the host
            for batch in args.batches:
                info["rows"] += bench_batch(name, batch, device, args, peak, state)
                write(args.out, info)  # after every section: a run stopped by a time cap keeps what it measured
            del state
        for name in args.models.split(","):
            if "maxbatch" not in args.skip and device.type == "cuda":
                sizes, line = list(MAX_BATCH_SIZES), memory_line(info["rows"], name)
                total = torch.cuda.get_device_properties(device).total_memory / 2**30
                guess = max([i for i, b in enumerate(sizes) if line and line(b) < 0.9 * total] or [0])
                no = largest_batch(name, device, args, False, sizes, guess, line)
                # checkpointing only lowers memory: search above the largest batch that fits without it, top first
                above = [b for b in sizes if b > no["largest"]]
                yes = largest_batch(name, device, args, True, above, len(above) - 1)
                yes["largest"] = max(yes["largest"], no["largest"])
                info.setdefault("max_batch", {})[name] = {
                    "no_ckpt": no["largest"], "ckpt": yes["largest"], "sizes": sizes, "no_ckpt_capped": no["capped"],
                    "ckpt_capped": yes["largest"] == sizes[-1], "trials": {"no_ckpt": no["trials"],
                                                                         "ckpt": yes["trials"]}}
                print(f"{name}: largest igscale ZeRO-2 batch of {sizes} without / with activation checkpointing: "
                      f"{no['largest']} / {yes['largest']}", flush=True)
                write(args.out, info)
            if "sampling" not in args.skip:
                r = sampling(name, device, args, peak)
                info.setdefault("sampling", {})[name] = r
                write(args.out, info)
                modes = r.get("modes", {"forward": r})
                print(f"{name}: sampling batch {r['batch']}: " + ", ".join(
                    f"{m} {v['img_nfe_per_s']:.1f} img·NFE/s MFU {100 * v['forward_tflops'] / peak:.1f}%"
                    for m, v in modes.items()), flush=True)
        if "vae" not in args.skip:
            size = 64 if args.tiny else 256
            info["vae_encode"] = vae_encode(device, 4 if args.tiny else 64, size, args)
            info["cpu_decode_crop"] = cpu_decode_crop(size, n=8 if args.tiny else 64)
            v, c = info["vae_encode"], info["cpu_decode_crop"]
            if "img_per_s" in v:
                print(f"VAE encode {v['size']}px batch {v['batch']}: {v['img_per_s']:.1f} img/s; CPU decode+crop "
                      f"{c['img_per_s_per_core']:.1f} img/s/core -> "
                      f"{math.ceil(v['img_per_s'] / c['img_per_s_per_core'])} cores per GPU to keep up")
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()
    info["wall_s"] = time.perf_counter() - t_start
    info["agreement_ok"] = all(r["agreement"]["ok"] for r in info["rows"] if r["agreement"] is not None)
    info["complete"] = True
    write(args.out, info)
    print(f"wrote {args.out} ({info['wall_s']:.0f} s); agreement {'ok' if info['agreement_ok'] else 'FAILED'}")
    return 0 if info["agreement_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
