"""DeepSpeed adapter: ds_config from RunConfig, optimizer choice, and the handful of engine calls the trainer uses.

The trainer only sees this class (forward/backward/step, LR, grad norm, parameter views for the EMA, save/load), so
ZeRO stage and precision stay a config detail. Any nn.Module works; the engine never imports igscale.models.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist

from igscale.config.schema import RunConfig
from igscale.distributed.collectives import all_gather

__all__ = ["build_ds_config", "DeepSpeedEngine", "init_deepspeed_distributed", "assemble_flat"]


def assemble_flat(pieces: list[tuple[int, torch.Tensor]], shape: list[int], numel: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Full fp32 tensor on `device` from (start, flat piece) slices of its flattened form; ZeRO-3 padding past
    numel is dropped."""
    full = torch.zeros(numel, dtype=torch.float32, device=device)
    for start, piece in pieces:
        n = max(0, min(piece.numel(), numel - start))
        full[start:start + n] = piece.detach().float().flatten()[:n].to(device)
    return full.view(shape)


def build_ds_config(cfg: RunConfig, world_size: int, *, device_skip: bool = False,
                    zero_stage: int | None = None, optimizer_clips: bool = False, single_group: bool = False) -> dict:
    """device_skip: the optimizer skips non-finite steps on the device (`found_inf`), so DeepSpeed's own bf16
    overflow check, a host sync and an extra all-reduce every step, is turned off. zero_stage: DeepSpeed's stage
    when it differs from cfg's (an optimizer that shards its own state runs on an unpartitioned DeepSpeed).
    optimizer_clips: the optimizer clips by the global norm itself (Muon), so DeepSpeed does not.
    single_group: ZeRO-3 keeps all weights in one sub-group (the optimizer steps them in one call)."""
    e = cfg.engine
    stage = e.zero_stage if zero_stage is None else zero_stage
    zero: dict = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=int(5e7))
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
        if single_group:  # one sub-group: the optimizer sees every weight in one call
            zero["sub_group_size"] = int(1e12)
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch(world_size),
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": 0.0 if optimizer_clips else e.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16", "check_grad_overflow": not device_skip},
        "fp16": {"enabled": e.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if e.precision == "bf16_autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def init_deepspeed_distributed() -> None:
    """Join DeepSpeed to the existing process group (created by igscale.distributed.env.init_distributed).

    On CPU, DeepSpeed compiles a shared-memory comm op (~35 s) at init even with gloo; gloo does not need it, so
    the builder is replaced by a no-op in the module object (the name `deepspeed.comm.torch` resolves to torch).
    A plain single process (no launcher) gets a one-rank group on loopback: without launcher variables DeepSpeed
    would fall back to MPI discovery, which needs mpi4py and a launcher.
    """
    import deepspeed

    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _build_optimizer(params, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        # fused on CUDA and CPU alike: one kernel per step, and it can skip a step on the device (found_inf)
        return torch.optim.AdamW(params, fused=True, **kw)
    if o.name == "fused_adam":
        if not torch.cuda.is_available():
            raise ValueError("optim.name=fused_adam needs CUDA; use adamw (or cpu_adam with offload) on CPU")
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **kw)
    if o.name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    raise ValueError(f"optim.name={o.name!r} must be built by the caller and passed as `optimizer=`")


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` device tensor (skips the update and keeps its state)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False) or getattr(optimizer, "supports_found_inf",
                                                                                  False))


def _guard_on_host(optimizer: torch.optim.Optimizer) -> None:
    """For optimizers without device-side skipping: check `found_inf` on the host (one sync per step)."""
    inner = optimizer.step

    def step(*args, **kwargs):
        found = getattr(optimizer, "found_inf", None)
        if found is not None and bool(found):
            return None
        return inner(*args, **kwargs)

    optimizer.step = step


class DeepSpeedEngine:
    """Wraps deepspeed.initialize. `optimizer` may be given (e.g. Muon); otherwise it is built from cfg.optim.

    Non-finite steps are skipped through the client optimizer's `found_inf`: `step(skip)` takes a device flag (the
    trainer's agreed loss check, or a requested halt), and a step pre-hook adds DeepSpeed's global gradient norm
    (or, without ZeRO, the norm this class computes) so a step with finite loss but non-finite gradients is skipped
    too. Everything stays on the device; DeepSpeed's own overflow check is off where the optimizer can skip.
    """

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, *, world_size: int,
                 optimizer: torch.optim.Optimizer | None = None):
        import deepspeed

        self.cfg = cfg
        # an optimizer that shards its own state over whole matrices (igscale's ZeRO-1 Muon) runs on an
        # unpartitioned DeepSpeed; igscale's ZeRO-2/3 Muon reads DeepSpeed's partitions (bind_zero below)
        self.zero_stage = 0 if getattr(optimizer, "whole_params", False) else cfg.engine.zero_stage
        if cfg.engine.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if optimizer is None:
            optimizer = _build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        self.client_optimizer = optimizer
        self.device_skip = skips_on_device(optimizer)
        if not self.device_skip:
            _guard_on_host(optimizer)
        self.ds_config = build_ds_config(cfg, world_size, device_skip=self.device_skip, zero_stage=self.zero_stage,
                                         optimizer_clips=getattr(optimizer, "clips_itself", False),
                                         single_group=getattr(optimizer, "single_group", False))
        for g in optimizer.param_groups:  # LR schedules scale each group's own base LR (Muon and Adam differ)
            g.setdefault("base_lr", g["lr"])
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
        if hasattr(optimizer, "bind_zero"):
            optimizer.bind_zero(self.ds.optimizer, self.zero_stage)
        self.module: torch.nn.Module = self.ds.module
        self._names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self._views: list[tuple[str, torch.Tensor]] | None = None
        self._skip: torch.Tensor | None = None
        self._own_norm: torch.Tensor | None = None
        # ZeRO 1-3 and DeepSpeed's bf16 optimizer compute the global norm (set before the client's step runs)
        self._ds_norm = hasattr(self.ds.optimizer, "_global_grad_norm")
        optimizer.register_step_pre_hook(self._set_found_inf)

    # -- training ------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self, skip: torch.Tensor | None = None) -> None:
        """DeepSpeed step; at the accumulation boundary `skip` (a device bool/float scalar) voids the update."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary and not self._ds_norm:
            # The plain client optimizer (no ZeRO, no DeepSpeed bf16 wrapper): DeepSpeed clips but reports no norm.
            # The gradients are already all-reduced here, so the norm is the same on every rank.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            self._own_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()) if grads \
                else None
        self._skip = skip if boundary else None
        try:
            self.ds.step()
        finally:
            self._skip = None

    def _set_found_inf(self, optimizer, _args, _kwargs) -> None:
        """Step pre-hook of the client optimizer: found_inf = requested skip | non-finite global gradient norm."""
        norm = getattr(self.ds.optimizer, "_global_grad_norm", None) if self._ds_norm else self._own_norm
        bad = None
        if torch.is_tensor(norm):
            bad = ~torch.isfinite(norm.float())
        if self._skip is not None:
            s = self._skip.bool()
            bad = s if bad is None else bad | s.to(bad.device)
        if bad is None:
            optimizer.found_inf = None
            return
        dev = next((p.device for g in optimizer.param_groups for p in g["params"]), bad.device)
        optimizer.found_inf = bad.to(dev, torch.float32, non_blocking=True).reshape(())
        optimizer.grad_scale = None

    def set_lr_factor(self, factor: float) -> None:
        for g in self.ds.optimizer.param_groups:
            g["lr"] = g.get("base_lr", g["lr"]) * factor
        for g in self.optimizer.param_groups:
            if "base_lr" in g:
                g["lr"] = g["base_lr"] * factor

    def lr(self) -> float:
        return float(self.ds.optimizer.param_groups[0]["lr"])

    def grad_norm_value(self) -> torch.Tensor | float:
        """The last step's global gradient norm as DeepSpeed left it (often a device tensor: read it lazily)."""
        n = self.ds.get_global_grad_norm() if self._ds_norm else self._own_norm
        return float("nan") if n is None else n

    def grad_norm(self) -> float:
        return float(self.grad_norm_value())

    def low_precision_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.engine.precision, torch.float32)

    # -- weights -------------------------------------------------------------------------------------------
    def param_views(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor): this rank's view of each trainable weight's fp32 master copy, for the EMA.

        - ZeRO-3: the rank's flat fp32 partition (safe_get_local_fp32_param; same layout as `ds_tensor`).
        - ZeRO-1/2 and DeepSpeed's bf16 optimizer: the rank's flat fp32 fragment of the parameter (possibly empty).
        - DeepSpeed's unfused fp16/bf16 wrapper (ZeRO-0 with low-precision weights): its full fp32 copy.
        - otherwise: the full parameter (identical on every rank).
        A view is a flat slice starting at `view_layout()[name][0]` of the flattened parameter.
        """
        if self._views is not None:
            return self._views
        params = dict(self.module.named_parameters())
        opt = self.ds.optimizer
        # the unfused wrapper keeps fp32 copies in groups parallel to the low-precision parameters
        master = {id(lp): hp for lg, hg in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
                  for lp, hp in zip(lg, hg)} if self.zero_stage == 0 else {}
        out = []
        for n in self._names:
            p = params[n]
            if id(p) in master:
                out.append((n, master[id(p)]))
            elif self.zero_stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param

                v = safe_get_local_fp32_param(p)
                out.append((n, v if v is not None else p.ds_tensor))
            elif hasattr(p, "_hp_mapping"):
                m = p._hp_mapping
                out.append((n, m.get_hp_fragment() if m is not None else p.new_empty(0, dtype=torch.float32)))
            else:
                out.append((n, p))
        if self.zero_stage < 3:  # views into persistent fp32 buffers (or the parameters): build the list once
            self._views = out
        return out

    @property
    def sharded_views(self) -> bool:
        """True when each rank's views hold only its own part of the weights (so every rank saves its EMA)."""
        p = dict(self.module.named_parameters())[self._names[0]]
        return self.zero_stage == 3 or hasattr(p, "_hp_mapping")

    def view_layout(self) -> dict[str, tuple[int, list[int], int]]:
        """name -> (start of this rank's view in the flattened parameter, full shape, full numel)."""
        params = dict(self.module.named_parameters())
        rank = dist.get_rank() if dist.is_initialized() else 0
        out = {}
        for n in self._names:
            p = params[n]
            if self.zero_stage == 3:
                out[n] = (rank * p.ds_tensor.ds_numel, list(p.ds_shape), int(p.ds_numel))
            elif getattr(p, "_hp_mapping", None) is not None:
                out[n] = (p._hp_mapping.lp_fragment_address.start, list(p.shape), p.numel())
            else:
                out[n] = (0, list(p.shape), p.numel())
        return out

    def gather_shard(self, name: str, shard: torch.Tensor) -> torch.Tensor:
        """Collective: the full tensor of `name` from every rank's view-shaped `shard` (e.g. an EMA shard)."""
        start, shape, numel = self.view_layout()[name]
        if not self.sharded_views or not dist.is_initialized():
            return shard.detach().float().clone().view(shape)
        metas = [tuple(int(v) for v in m) for m in all_gather(torch.tensor([start, shard.numel()]))]
        width = max(n for _, n in metas)
        padded = torch.zeros(width, dtype=shard.dtype, device=shard.device)
        padded[: shard.numel()] = shard.detach().flatten()
        parts = all_gather(padded)
        return assemble_flat([(s, part[:n]) for (s, n), part in zip(metas, parts)], shape, numel, shard.device)

    @contextlib.contextmanager
    def full_params(self):
        """Context in which module parameters are whole on every rank (a no-op below ZeRO-3)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module

    def full_state_dict(self, *, frozen_only: bool = False, device: torch.device | str = "cpu"
                        ) -> dict[str, torch.Tensor]:
        """Collective under ZeRO-3: every (or, frozen_only, every non-trainable) state-dict tensor, fp32 on device."""
        trainable = set(self._names) if frozen_only else set()
        with self.full_params() as m:
            return {k: v.detach().to(device, torch.float32, copy=True) for k, v in m.state_dict().items()
                    if k not in trainable}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, save_dir: str, tag: str) -> None:
        """DeepSpeed training state (weights, optimizer, ZeRO partitions) of this rank into save_dir/tag."""
        os.makedirs(save_dir, exist_ok=True)
        self.ds.save_checkpoint(save_dir, tag=tag, save_latest=False)

    def load(self, load_dir: str, tag: str, *, universal: bool = False) -> None:
        """universal: load_dir/tag is DeepSpeed's universal checkpoint (any world size). DeepSpeed reads its
        `checkpoint.load_universal` setting only while loading, so it is switched on for this load alone."""
        conf = self.ds._config
        before = conf.load_universal_checkpoint
        conf.load_universal_checkpoint = universal
        try:
            path, _ = self.ds.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        finally:
            conf.load_universal_checkpoint = before
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {load_dir}")
