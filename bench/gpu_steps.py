"""The two training steps bench/bench_gpu.py times, plus the pieces it needs around them.

IgscaleStep is what `igscale train` runs: a RunConfig from the run's YAML, the model, activation checkpointing and
compile built as igscale/cli/train.py builds them, igscale's DeepSpeedEngine, and the trainer's loop order from
igscale/training/loop.py (launch step j, read step j-1's flags, queue its EMA update, queue step j's update).
ReferenceStep is the official trainers' structure on the same weights and inputs: eager IGDiT with SDPA attention,
fp32 weights under bf16 autocast, for-loop AdamW, per-tensor gradient clipping and a per-tensor EMA loop.
"""
from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from igscale.config.load import load_config
from igscale.config.schema import MUON_ZERO_STAGES, RunConfig
from igscale.diffusion.losses import ig_loss
from igscale.models import build_model
from igscale.training.ema import EMA
from igscale.training.step import draw_step_randomness, launch_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"SiT-XL/2": "configs/sit_xl2_ig.yaml", "LightningDiT-XL/1": "configs/lightningdit_xl1_ig.yaml"}
TINY = dict(input_size=8, hidden_size=64, depth=4, num_heads=2, ig_layers=[2], num_classes=10)
TINY_EXTRA = {"LightningDiT": dict(in_channels=8, patch_size=1)}


# ---------------------------------------------------------------------------------------------------------------------
# process group, configs, weights


def ensure_group(device: torch.device) -> bool:
    """A one-rank process group (nccl on CUDA, gloo on CPU) joined by DeepSpeed; True if this call created it."""
    from igscale.distributed.engine import init_deepspeed_distributed

    owns = not dist.is_initialized()
    if owns:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    init_deepspeed_distributed()
    return owns


def run_config(model: str, batch: int, zero_stage: int, *, tiny: bool, ckpt: bool | None = None,
               backend: str | None = None) -> RunConfig:
    """The model's run config with the bench's overrides (world size 1: global batch = per-GPU batch).

    A Muon config runs Muon at every stage (replicated at 0, sharded by igscale at 1, on DeepSpeed's partitions
    at 2 and 3); the adamw fallback covers stages RunConfig refuses for Muon."""
    path = os.path.join(ROOT, CONFIGS.get(model, "configs/sit_xl2_ig.yaml"))  # other names: the SiT recipe
    ov = ["data.manifest_url=bench"] + ([] if model in CONFIGS else [f"model.name={model}"])
    base = load_config(path, ov)
    ov += [f"train.global_batch={batch}", f"engine.zero_stage={zero_stage}"]
    if base.optim.name == "muon" and zero_stage not in MUON_ZERO_STAGES:
        ov.append("optim.name=adamw")
    if tiny:  # the config's other model fields (e.g. ig_head_init) stay; the size shrinks; compile runs on CPU too
        small = {**TINY, **TINY_EXTRA.get(model.split("-")[0], {})}
        ov += [f"model.{k}={json.dumps(v)}" for k, v in small.items()]
        ov += ["model.compile=blocks", "model.compile_backend=aot_eager"]
    if ckpt is not None:
        ov.append(f"model.activation_checkpointing={str(ckpt).lower()}")
    if backend:
        ov.append(f"model.compile_backend={backend}")
    return load_config(path, ov)


def initial_state(cfg: RunConfig, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Weights both steps start from: the model as built, with every weight but pos_embed randomised with a small std
    (zero-initialised gates and heads would hide most of the network from the agreement check); norms stay near 1.
    Values are rounded to bf16 so that DeepSpeed's bf16 weights and the reference's fp32 weights start out equal."""
    torch.manual_seed(cfg.train.seed)
    m = build_model(cfg.model.name, **cfg.model.arch_overrides())
    g = torch.Generator().manual_seed(cfg.train.seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.copy_((torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in n else 0.0)).bfloat16().float())
    return {k: v.clone() for k, v in m.state_dict().items()}


def synthetic_batch(cfg: RunConfig, model_config, device: torch.device) -> dict:
    """One micro-batch of random latents of the model's shape and random labels, already on the device."""
    g = torch.Generator().manual_seed(cfg.train.seed + 1)
    B = cfg.micro_batch(1)
    return {"latent": torch.randn(B, *model_config.latent_shape, generator=g).to(device),
            "label": torch.randint(0, model_config.num_classes, (B,), generator=g).to(device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# the two steps


class IgscaleStep:
    """`igscale train`'s model, engine, EMA and step order (igscale/cli/train.py, igscale/training/loop.py)."""

    variant = "igscale"

    def __init__(self, cfg: RunConfig, device: torch.device, state: dict | None = None):
        from igscale.training.build import build_engine

        self.cfg, self.device = cfg, device
        t0 = time.perf_counter()
        torch._dynamo.reset()  # a fresh compile, as in a new `igscale train` process (and no recompile limit)
        graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        self.engine, self.compile_mode = build_engine(cfg, world_size=1, device=device, state=state)  # as train
        model = self.engine.module
        optimizer = self.engine.client_optimizer
        self.ema = EMA(self.engine.param_views(), cfg.train.ema_decay)  # --- as Trainer.__init__ ---
        self.model_config = model.config
        self.batches = [synthetic_batch(cfg, model.config, device)]
        self.step_no, self.prev = 0, None
        self.build_s = time.perf_counter() - t0
        self._graphs0 = graphs0
        client = getattr(self.engine.ds, "client_optimizer", None) or optimizer
        fused = getattr(client, "defaults", {}).get("fused")
        self.info = {"variant": "igscale", "zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision,
                     "optimizer": type(client).__name__ + ("(fused)" if fused else ""),
                     "ds_optimizer": type(self.engine.optimizer).__name__, "compile": self.compile_mode,
                     "compile_backend": cfg.model.compile_backend if self.compile_mode != "none" else None,
                     "attn_backend": model.config.attn_backend, "device_skip": self.engine.device_skip,
                     "activation_checkpointing": cfg.model.activation_checkpointing,
                     "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def compiled_graphs(self) -> int:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"] - self._graphs0)

    def _launch(self):
        from igscale.training.lr_schedule import lr_at
        from igscale.training.rng import seed_global

        j, cfg = self.step_no, self.cfg
        self.engine.set_lr_factor(lr_at(j, 1.0, cfg.optim.warmup_steps))
        seed_global(cfg.train.seed, 0, j)
        self.step_no += 1
        return launch_step(self.engine, self.batches, cfg, rank=0, world_size=1, step=j, device=self.device)

    def _resolve_prev(self) -> None:
        if self.prev is not None and not self.prev.result().skipped:
            self.ema.update(self.engine.param_views())  # queued before the next step's optimizer update
        self.prev = None

    def step(self) -> None:
        """One trainer iteration: launch j, book j-1 (flags, EMA), queue j's optimizer update."""
        handle = self._launch()
        self._resolve_prev()
        handle.finish()
        self.prev = handle

    def drain(self) -> None:
        self._resolve_prev()

    def loss_and_grads(self) -> tuple[float, dict[str, torch.Tensor]]:
        """Step 0's loss and the engine's full fp32-or-bf16 gradients after backward, before the optimizer step."""
        from deepspeed.utils import safe_get_full_grad

        assert self.step_no == 0, "the agreement check uses step 0's randomness"
        handle = self._launch()
        grads = {n: safe_get_full_grad(p).detach().float().clone()
                 for n, p in self.engine.module.named_parameters() if p.requires_grad}
        handle.finish()
        self.prev = handle
        return handle.result().loss, grads

    def close(self) -> None:
        self.prev = None
        self.engine.ds.destroy()
        self.engine = self.ema = self.batches = None
        torch._dynamo.reset()
        free_memory(self.device)


class ReferenceStep:
    """The official trainers' step structure on the same model class, weights, inputs and randomness."""

    variant = "reference"

    def __init__(self, cfg: RunConfig, device: torch.device, state: dict | None = None):
        self.cfg, self.device = cfg, device
        t0 = time.perf_counter()
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model.name, **{**cfg.model.arch_overrides(), "attn_backend": "sdpa"}).to(device)
        if state is not None:
            self.model.load_state_dict(state)
        self.model.train().set_activation_checkpointing(cfg.model.activation_checkpointing)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay, foreach=False)
        self.ema = EMA(named, cfg.train.ema_decay)
        self._named = named
        self.model_config = self.model.config
        self.batch = synthetic_batch(cfg, self.model.config, device)
        self.step_no = 0
        self.build_s = time.perf_counter() - t0
        self.info = {"variant": "reference", "zero_stage": None, "precision": "fp32 weights + bf16 autocast",
                     "optimizer": "AdamW(foreach=False)", "ds_optimizer": None, "compile": "none",
                     "compile_backend": None, "attn_backend": "sdpa", "device_skip": False,
                     "activation_checkpointing": cfg.model.activation_checkpointing,
                     "trainable_params": sum(p.numel() for p in self.params)}

    def _loss(self) -> torch.Tensor:
        cfg, dev, L = self.cfg, self.device, self.cfg.loss
        x0, y = self.batch["latent"], self.batch["label"]
        noise, t, drop = draw_step_randomness(cfg, rank=0, step=self.step_no, micro=0, shape=tuple(x0.shape))
        self.step_no += 1
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            terms = ig_loss(self.model, x0, y, t.to(dev), noise.to(dev), path=L.path, aux_weight=L.aux_weight,
                            cosine_loss=L.cosine_loss, drop_mask=drop.to(dev))
        return terms["loss"].mean()

    def step(self) -> None:
        self._loss().backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.engine.grad_clip, foreach=False)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self._named, foreach=False)

    def drain(self) -> None:
        pass

    def loss_and_grads(self) -> tuple[float, dict[str, torch.Tensor]]:
        assert self.step_no == 0, "the agreement check uses step 0's randomness"
        loss = self._loss()
        loss.backward()
        # kept on the host while the igscale rows run, so they do not count in those rows' GPU memory
        grads = {n: p.grad.detach().to("cpu", torch.float32, copy=True) for n, p in self._named}
        self.opt.zero_grad(set_to_none=True)  # the timed steps start from the same weights, no update applied
        return float(loss.detach()), grads

    def compiled_graphs(self) -> int:
        return 0

    def close(self) -> None:
        self.model = self.opt = self.ema = self.params = self._named = self.batch = None
        free_memory(self.device)


# ---------------------------------------------------------------------------------------------------------------------
# agreement and timing


def agreement(loss: float, grads: dict, ref_loss: float, ref_grads: dict, tol: float = 1e-2) -> dict:
    """Loss relative error, global gradient relative error ||g_a - g_b|| / ||g_b|| over all parameters, and the
    worst per-tensor relative error (information only)."""
    if set(grads) != set(ref_grads):
        return {"ok": False, "error": f"parameter sets differ: {sorted(set(grads) ^ set(ref_grads))[:5]}"}
    diff2 = ref2 = 0.0
    worst, worst_name = 0.0, None
    for n, gb in ref_grads.items():
        d = float((grads[n].to(gb.device) - gb).norm()) ** 2
        b = float(gb.norm()) ** 2
        diff2, ref2 = diff2 + d, ref2 + b
        r = (d / max(b, 1e-24)) ** 0.5
        if r > worst:
            worst, worst_name = r, n
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    grad_rel = (diff2 / max(ref2, 1e-24)) ** 0.5
    ok = all(v == v for v in (loss_rel, grad_rel)) and loss_rel < tol and grad_rel < tol
    return {"ok": ok, "tol": tol, "loss": loss, "ref_loss": ref_loss, "loss_rel": loss_rel, "grad_rel": grad_rel,
            "grad_rel_worst_tensor": worst, "worst_tensor": worst_name}


def time_steps(step, device: torch.device, per_window: int, warmup: int, repeats: int) -> dict:
    """Seconds per step: the median over `repeats` windows of `per_window` back-to-back steps, each window timed by
    wall clock between device synchronisations (no per-step syncs), after `warmup` windows (compile, autotune)."""
    for _ in range(warmup * per_window):
        step.step()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_window):
            step.step()
        sync(device)
        times.append((time.perf_counter() - t0) / per_window)
    step.drain()
    return {"s_per_step": statistics.median(times), "windows_s": times}


def matmul_tflops(device: torch.device, n: int, repeats: int = 10) -> float:
    """Measured dense matmul rate (bf16 on CUDA, fp32 on CPU): the MFU denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t0) / 5)
    return 2 * n**3 / statistics.median(times) / 1e12


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_mem_gib(device: torch.device, base: int = 0) -> float:
    """Peak GPU memory since the last reset_peak, less `base` bytes held before the row started; NaN on CPU."""
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
