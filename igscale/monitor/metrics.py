"""Rank-0 monitoring: TensorBoard scalars and sample-grid images, a concise stdout line, and the MFU estimate.

Only rank 0 constructs a real writer; other ranks get a sink whose methods do nothing, so call sites need no
rank checks. Event files are written locally (run_dir/tensorboard); sync them to S3 with the checkpoints if needed
(writing straight to S3 re-uploads the whole file on every flush).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch

__all__ = ["MetricsSink", "peak_flops", "memory_gb", "latent_grid", "format_line"]

# Dense bf16 peaks per device (FLOP/s), used when logging.peak_tflops is 0.
_PEAKS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(override_tflops: float = 0.0) -> float:
    """Per-device peak FLOP/s: the override, else a known GPU value, else 0 (MFU not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for k, v in _PEAKS.items():
            if k in name:
                return v
    return 0.0


def memory_gb() -> float:
    """Peak accelerator memory (CUDA) or peak resident set size of this process (CPU), in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20


def latent_grid(x: torch.Tensor, nrow: int = 0) -> torch.Tensor:
    """(N, C, H, W) samples -> (3, H', W') float image in [0, 1]; latents show their first 3 channels."""
    x = x.detach().float().cpu()
    if x.shape[1] >= 3:
        x = x[:, :3]
    else:
        x = x[:, :1].expand(-1, 3, -1, -1)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-8)
    N, C, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    rows = math.ceil(N / nrow)
    grid = torch.ones(3, rows * (H + 1) + 1, nrow * (W + 1) + 1)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = x[i]
    return grid


def format_line(step: int, total: int, s: dict) -> str:
    parts = [f"step {step}/{total}", f"img {s.get('progress/images', 0):.0f}", f"ep {s.get('progress/epoch', 0):.3f}",
             f"loss {s.get('train/loss', float('nan')):.4f}", f"aux {s.get('train/loss_aux', float('nan')):.4f}",
             f"gnorm {s.get('train/grad_norm', float('nan')):.3f}", f"lr {s.get('train/lr', 0):.2e}",
             f"{s.get('perf/img_per_s', 0):.1f} img/s"]
    if s.get("perf/mfu", 0) > 0:
        parts.append(f"mfu {100 * s['perf/mfu']:.1f}%")
    parts += [f"wait {100 * s.get('perf/data_wait_frac', 0):.0f}%", f"mem {s.get('sys/mem_gb', 0):.1f}G"]
    if s.get("train/nonfinite_skipped", 0):
        parts.append(f"skipped {s['train/nonfinite_skipped']:.0f}")
    return " | ".join(parts)


class MetricsSink:
    """`flops_per_image` and `peak` (per device) turn img/s into an MFU estimate over `world_size` devices."""

    def __init__(self, log_dir: str, *, enabled: bool, tensorboard: bool = True, stream=None,
                 flops_per_image: float = 0.0, peak: float = 0.0, world_size: int = 1, jsonl: str | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.writer = None
        self.flops_per_image, self.peak, self.world_size = flops_per_image, peak, world_size
        self.jsonl = jsonl if enabled else None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(float(v)):
                    self.writer.add_scalar(k, float(v), step)

    def log_step(self, step: int, total: int, values: dict[str, float]) -> None:
        """Add memory and MFU, then write TensorBoard scalars, a jsonl record and the stdout line."""
        if not self.enabled:
            return
        values = dict(values, **{"sys/mem_gb": memory_gb()})
        if self.flops_per_image > 0 and self.peak > 0:
            values["perf/mfu"] = values["perf/img_per_s"] * self.flops_per_image / (self.peak * self.world_size)
        self.scalars(step, values)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self.line(format_line(step, total, values))

    def image(self, step: int, tag: str, img: torch.Tensor) -> None:
        """img: a (3, H, W) image in [0, 1], or (N, C, H, W) samples turned into a grid by latent_grid."""
        if self.writer is not None:
            img = latent_grid(img) if img.dim() == 4 else img
            self.writer.add_image(tag, img.clamp(0, 1), step, dataformats="CHW")

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
