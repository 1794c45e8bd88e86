"""The model + compile + optimizer + DeepSpeed engine of a run, built one way for `igscale train` and the GPU
benchmark (so a benchmark figure describes the code users run)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from igscale.config.schema import RunConfig
from igscale.distributed.engine import DeepSpeedEngine
from igscale.models import build_model
from igscale.models.compile import apply_compile, resolve_compile_mode
from igscale.training.muon import MuonWithAdam, muon_param_groups
from igscale.training.muon_sharded import ShardedMuonWithAdam
from igscale.training.muon_zero import ZeroMuonWithAdam

__all__ = ["build_engine"]


def build_engine(cfg: RunConfig, *, world_size: int, device: torch.device,
                 state: dict[str, torch.Tensor] | None = None) -> tuple[DeepSpeedEngine, str]:
    """(engine, resolved compile mode). `state` replaces the initial weights (benchmarks start two steps from
    the same weights); otherwise every rank draws the same weights from train.seed."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model.name, **cfg.model.arch_overrides()).to(device)
    if state is not None:
        model.load_state_dict(state)
    model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    mode = resolve_compile_mode(cfg.model.compile, device.type, cfg.engine.zero_stage)
    apply_compile(model, mode, backend=cfg.model.compile_backend, fullgraph=cfg.engine.zero_stage < 3)
    optimizer = None
    if cfg.optim.name == "muon":
        o = cfg.optim
        groups = muon_param_groups(
            model.named_parameters(), muon_lr=o.muon_lr, muon_wd=o.muon_weight_decay, momentum=o.muon_momentum,
            ns_steps=o.muon_ns_steps, adam_lr=o.lr, betas=o.betas, eps=o.eps, adam_wd=o.weight_decay)
        rank, clip = dist.get_rank() if dist.is_initialized() else 0, cfg.engine.grad_clip
        if cfg.engine.zero_stage == 1:  # state and Newton-Schulz work divided over the ranks
            optimizer = ShardedMuonWithAdam(groups, rank=rank, world_size=world_size, max_grad_norm=clip)
        elif cfg.engine.zero_stage >= 2:  # and the gradients (2) and weights (3), partitioned by DeepSpeed
            optimizer = ZeroMuonWithAdam(groups, rank=rank, world_size=world_size, max_grad_norm=clip)
        else:
            optimizer = MuonWithAdam(groups, max_grad_norm=clip)
    return DeepSpeedEngine(model, cfg, world_size=world_size, optimizer=optimizer), mode
