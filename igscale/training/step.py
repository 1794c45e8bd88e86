"""One optimizer step: grad_accum micro-batches -> IG loss -> engine backward/step, with non-finite-step skipping.

All randomness (noise, t, label-dropout mask) comes from counter-based streams keyed by (seed, rank, step, micro),
so a resumed run draws exactly what an uninterrupted one would.

The step never waits for the device. Each micro-batch adds its loss terms and a non-finite bit to a device tensor;
before the boundary's optimizer update one all-reduce (through igscale.distributed.collectives) combines them with
every rank's stop request. The update is skipped on the device (the optimizer's `found_inf`) when any rank saw a
non-finite loss or the caller asks for a halt, so all ranks take the same decision without a host round trip.
The host reads the flags later from a pinned copy (`StepHandle.result()`), normally one step behind.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from igscale.config.schema import RunConfig
from igscale.diffusion.losses import ig_loss
from igscale.diffusion.timesteps import sample_t
from igscale.distributed.collectives import all_reduce
from igscale.training.rng import DROP, NOISE, TIME, stream_generator

__all__ = ["StepResult", "StepHandle", "train_step", "launch_step", "draw_step_randomness"]

# layout of the per-step flag vector: 4 loss sums, non-finite micro-batch count, stop requests
_LOSS, _BAD, _STOP, _NFLAGS = slice(0, 4), 4, 5, 6


@dataclass
class StepResult:
    loss: float = 0.0
    main: float = 0.0
    aux: float = 0.0
    cos: float = 0.0
    skipped: bool = False
    """True when a non-finite loss on some rank made the step a no-op (no optimizer update, no EMA update)."""
    stop_requested: bool = False
    """Some rank received a preemption signal (all ranks see the same value)."""
    grad_norm: float = float("nan")


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


class StepHandle:
    """A launched step whose optimizer update is still to be queued (`finish`) and whose flags are read later."""

    def __init__(self, engine, flags: torch.Tensor, n_micro: int, world_size: int):
        self.engine, self.flags, self.n_micro, self.world_size = engine, flags, n_micro, world_size
        self._host: torch.Tensor | None = None
        self._event = None
        self.halted = False

    def finish(self, halt: bool = False) -> None:
        """Queue the boundary update: skipped if some rank's loss was non-finite, or if `halt` (the caller is
        stopping and this step must not count). Then start the copy of the flags to the host."""
        skip = self.flags[_BAD] > 0
        if halt:
            skip = torch.ones_like(skip)
        self.engine.step(skip)
        norm = self.engine.grad_norm_value()
        norm = norm.reshape(1).to(self.flags.device, torch.float64) if torch.is_tensor(norm) else \
            torch.full((1,), float(norm), dtype=torch.float64, device=self.flags.device)  # a fill, not a copy
        out = torch.cat([self.flags, norm])
        if out.is_cuda:
            self._host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self._host.copy_(out, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = out
        self.halted = halt

    def result(self) -> StepResult:
        """Waits for this step's flags only (not for work queued after it)."""
        if self._event is not None:
            self._event.synchronize()
        v = self._host.tolist()
        n = self.n_micro * self.world_size
        return StepResult(loss=v[0] / n, main=v[1] / n, aux=v[2] / n, cos=v[3] / n, skipped=v[_BAD] > 0 or self.halted,
                          stop_requested=v[_STOP] > 0, grad_norm=v[_NFLAGS])


def launch_step(engine, batches: list[dict], cfg: RunConfig, *, rank: int, world_size: int, step: int,
                device: torch.device, stop_flag: bool = False) -> StepHandle:
    """Forward/backward of every micro-batch and the one flag all-reduce; the boundary update is left to
    `StepHandle.finish`, so the caller can queue work (the previous step's EMA) before it."""
    dtype = engine.low_precision_dtype()

    def model_fn(x, t, y, drop_mask=None):  # DeepSpeed bf16/fp16 weights need inputs of their dtype
        return engine(x.to(dtype), t.to(dtype), y, drop_mask=drop_mask)

    flags = torch.zeros(_NFLAGS, dtype=torch.float64, device=device)
    for micro, batch in enumerate(batches):
        x0 = batch["latent"].to(device, torch.float32, non_blocking=True)  # (B, C, H, W)
        y = batch["label"].to(device, non_blocking=True)  # (B,)
        noise, t, drop = draw_step_randomness(cfg, rank=rank, step=step, micro=micro, shape=tuple(x0.shape))
        terms = ig_loss(model_fn, x0, y, t.to(device), noise.to(device), path=cfg.loss.path,
                        aux_weight=cfg.loss.aux_weight, cosine_loss=cfg.loss.cosine_loss, drop_mask=drop.to(device))
        # a rank's piece of an elastic round's tail can be empty: it adds zero loss and zero gradient, not NaN
        reduce = torch.mean if x0.shape[0] else torch.sum
        local = torch.stack([reduce(terms[k].detach()) for k in ("loss", "main", "aux", "cos")]).double()  # (4,)
        flags[_LOSS] += local.nan_to_num(0.0, 0.0, 0.0)
        flags[_BAD] += (~torch.isfinite(local)).any().double()
        engine.backward(reduce(terms["loss"]))
        if micro < len(batches) - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-batch
    flags[_STOP] = float(stop_flag)  # a fill on the device, not a copy
    flags = all_reduce(flags)  # the one collective of this step
    return StepHandle(engine, flags, len(batches), world_size)


def train_step(engine, batches: list[dict], cfg: RunConfig, *, rank: int, world_size: int, step: int,
               device: torch.device, stop_flag: bool = False) -> StepResult:
    """One complete step, read back at once (benchmarks and tests; the trainer overlaps the read-back)."""
    h = launch_step(engine, batches, cfg, rank=rank, world_size=world_size, step=step, device=device,
                    stop_flag=stop_flag)
    h.finish()
    return h.result()
