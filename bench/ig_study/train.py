"""One training run of the study: a tiny SiT trained with or without the IG auxiliary loss.

Both arms of a seed start from the same weights and see exactly the same batches, times, noise and label drops (all
drawn from one generator seeded by the run seed), so aux_weight is the only difference between them.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.ig_study.config import StudyConfig
from bench.ig_study.data import NUM_CLASSES, SIZE
from igscale.diffusion.losses import ig_loss
from igscale.diffusion.timesteps import sample_t
from igscale.models import build_model
from igscale.training.ema import EMA


def build_study_model(cfg: StudyConfig) -> torch.nn.Module:
    m = cfg.model
    return build_model(
        "SiT-S/2", input_size=SIZE, in_channels=1, hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
        num_classes=NUM_CLASSES, ig_layers=(m.ig_layer,),
    )


@dataclass
class RunResult:
    seed: int
    aux_weight: float
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    """step -> EMA weights (name -> tensor)."""
    main_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    """Per-step batch means; aux is logged in both arms (in the no-aux arm it is the untrained head's error)."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """Process CPU time of the loop: the cost comparison between arms (wall time depends on the shared CPU's load)."""


def load_weights(cfg: StudyConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh study model in eval mode holding `weights` (every parameter must be present)."""
    model = build_study_model(cfg)
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        raise ValueError(f"weights do not match the study model: {sorted(set(params) ^ set(weights))[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    return model.eval()


def train_run(
    cfg: StudyConfig, x: torch.Tensor, y: torch.Tensor, seed: int, aux_weight: float,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Train for cfg.train.steps on (x (N, 1, 16, 16), y (N,)); EMA snapshots every cfg.train.eval_every steps."""
    tc = cfg.train
    torch.manual_seed(seed)  # model init: identical for both arms of a seed
    model = build_study_model(cfg).train()
    ema = EMA(model.named_parameters(), decay=tc.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(10_000 + seed)  # batches, t, noise, drops: identical for both arms
    res = RunResult(seed=seed, aux_weight=aux_weight)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(1, tc.steps + 1):
        idx = torch.randint(len(x), (tc.batch_size,), generator=g)
        x0, yb = x[idx], y[idx]  # (B, 1, 16, 16), (B,)
        t = sample_t(tc.batch_size, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        drop = torch.rand(tc.batch_size, generator=g) < tc.label_drop  # CFG label dropout, drawn here not globally
        for grp in opt.param_groups:
            grp["lr"] = tc.lr * min(1.0, step / max(1, tc.warmup_steps))
        out = ig_loss(model.forward_heads, x0, yb, t, noise, aux_weight=aux_weight, drop_mask=drop)
        loss = out["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # EMA warm-up (decay grows from 0) so early snapshots are not dominated by the random init.
        ema.update(model.named_parameters(), decay=min(tc.ema_decay, step / (step + 10)))
        res.main_loss.append(float(out["main"].detach().mean()))
        res.aux_loss.append(float(out["aux"].detach().mean()))
        if step % tc.eval_every == 0:
            res.snapshots[step] = {n: v.clone() for n, v in ema.shadow.items()}
        if progress:
            progress(step)
    res.seconds, res.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return res
