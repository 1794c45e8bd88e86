"""One optimizer step: grad_accum micro-batches -> IG loss -> engine backward/step, with non-finite-loss skipping.

All randomness (noise, t, label-dropout mask) comes from counter-based streams keyed by (seed, rank, step, micro),
so a resumed run draws exactly what an uninterrupted one would. Every micro-batch does one small all-reduce that
carries the loss terms, a non-finite flag and a stop flag, so all ranks take the same decision at the same time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from igscale.config.schema import RunConfig
from igscale.diffusion.losses import ig_loss
from igscale.diffusion.timesteps import sample_t
from igscale.training.rng import DROP, NOISE, TIME, stream_generator

__all__ = ["StepResult", "train_step", "draw_step_randomness"]


@dataclass
class StepResult:
    loss: float = 0.0
    main: float = 0.0
    aux: float = 0.0
    cos: float = 0.0
    skipped: bool = False
    """True when a non-finite loss made the step a no-op (no backward, no optimizer update)."""
    stop_requested: bool = False
    """Some rank received a preemption signal (all ranks see the same value)."""
    extra: dict = field(default_factory=dict)


def draw_step_randomness(cfg: RunConfig, *, rank: int, step: int, micro: int, shape: tuple[int, ...]):
    """(noise (B,C,H,W), t (B,), drop_mask (B,) bool) on CPU for one micro-batch."""
    B = shape[0]
    seed = cfg.train.seed
    noise = torch.randn(shape, generator=stream_generator(seed, rank, step, NOISE, micro))
    L = cfg.loss
    t = sample_t(B, kind=L.t_sampling, generator=stream_generator(seed, rank, step, TIME, micro),
                 mean=L.t_mean, std=L.t_std, shift=L.t_shift)
    drop = torch.rand(B, generator=stream_generator(seed, rank, step, DROP, micro)) < L.label_dropout
    return noise, t, drop


def _allreduce_sum(vals: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(vals, op=dist.ReduceOp.SUM)
    return vals


def train_step(engine, batches: list[dict], cfg: RunConfig, *, rank: int, world_size: int, step: int,
               device: torch.device, stop_flag: bool = False) -> StepResult:
    dtype = engine.low_precision_dtype()

    def model_fn(x, t, y, drop_mask=None):  # DeepSpeed bf16/fp16 weights need inputs of their dtype
        return engine(x.to(dtype), t.to(dtype), y, drop_mask=drop_mask)

    res = StepResult()
    totals = torch.zeros(4, dtype=torch.float64)
    for micro, batch in enumerate(batches):
        x0 = batch["latent"].to(device, torch.float32, non_blocking=True)  # (B, C, H, W)
        y = batch["label"].to(device, non_blocking=True)  # (B,)
        noise, t, drop = draw_step_randomness(cfg, rank=rank, step=step, micro=micro, shape=tuple(x0.shape))
        terms = ig_loss(model_fn, x0, y, t.to(device), noise.to(device), path=cfg.loss.path,
                        aux_weight=cfg.loss.aux_weight, cosine_loss=cfg.loss.cosine_loss, drop_mask=drop.to(device))
        loss = terms["loss"].mean()
        local = torch.stack([terms[k].detach().mean().double().cpu() for k in ("loss", "main", "aux", "cos")])
        finite = bool(torch.isfinite(local).all())
        flags = torch.cat([local.nan_to_num(0.0, 0.0, 0.0), torch.tensor([float(not finite), float(stop_flag)],
                                                                          dtype=torch.float64)])
        flags = _allreduce_sum(flags)
        res.stop_requested = res.stop_requested or bool(flags[5] > 0)
        if flags[4] > 0:  # some rank saw NaN/Inf: every rank drops it together
            res.skipped = True
            if cfg.engine.grad_accum == 1:
                return res  # no backward, no step: the optimizer state is untouched
            # Mid-accumulation, DeepSpeed must still reach its boundary; a zero-input forward times 0 gives exact
            # zero gradients for this micro-batch (a NaN loss times 0 would still be NaN).
            d_f, d_i = model_fn(torch.zeros_like(x0), t.to(device), y, drop_mask=drop.to(device))
            loss = (d_f.float().sum() + d_i.float().sum()) * 0.0
        else:
            totals += flags[:4] / world_size
        engine.backward(loss)
        engine.step()
    n = len(batches)
    res.loss, res.main, res.aux, res.cos = (float(v) / n for v in totals)
    return res
