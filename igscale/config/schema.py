"""RunConfig: the typed, validated description of one training run.

Every section is a keyword-only dataclass built through `igscale.core.typed.from_dict`, so an unknown key or
a wrong type fails with the dotted path before any worker starts. `__post_init__` checks value ranges and
cross-field rules (raising ValueError, which `from_dict` turns into ConfigError with the section path).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from igscale.core.typed import ConfigError

__all__ = [
    "ModelSection", "DataSection", "LossSection", "OptimSection", "EngineSection", "TrainSection",
    "CheckpointSection", "LoggingSection", "SampleSection", "RunConfig", "MUON_ZERO_STAGES", "MODEL_ARCH_FIELDS",
]

# Muon orthogonalises whole gradient matrices: ZeRO-0 runs on the real parameters, ZeRO-1 shards the state and
# Newton-Schulz work itself (training/muon_sharded.py), ZeRO-2/3 map DeepSpeed's fp32 partitions back to whole
# tensors (training/muon_zero.py). DeepSpeed's bf16/fp16 optimizers flatten into low-precision groups, so Muon
# needs fp32 weights.
MUON_ZERO_STAGES = (0, 1, 2, 3)
MUON_PRECISIONS = ("fp32", "bf16_autocast")


@dataclass(kw_only=True)
class ModelSection:
    name: str = "SiT-XL/2"
    """Registry name passed to igscale.models.model_config (e.g. "SiT-XL/2", "LightningDiT-XL/1"); it fixes every
    architecture field below that is left unset (null)."""
    # Architecture: the fields of igscale.models.ModelConfig (tests/test_config.py keeps the two in step), each
    # None = the registry preset's value. Typed fields, not a free-form dict, so a YAML `base:` child or a command
    # line `model.depth=3` changes one field and keeps the others, and a typo or a wrong type fails at load.
    input_size: int | None = None
    """Latent spatial size (32 for SD-VAE at 256 px, 16 for VA-VAE f16)."""
    patch_size: int | None = None
    in_channels: int | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    num_classes: int | None = None
    """Class count; the index num_classes is the null (CFG) label."""
    class_dropout_prob: float | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu"] | None = None
    rope: bool | None = None
    qk_norm: bool | None = None
    ig_layers: tuple[int, ...] | None = None
    """1-based block indices after which an IG head reads the tokens; the first one is the guidance head."""
    ig_head_init: Literal["zero", "xavier"] | None = None
    time_convention: Literal["noise_at_1", "noise_at_0"] | None = None
    attn_backend: Literal["auto", "flash", "sdpa", "math"] | None = None
    decoder_hidden_size: int | None = None
    # Execution: how the model runs, not what it is.
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward (model.set_activation_checkpointing)."""
    compile: Literal["auto", "blocks", "full", "none"] = "auto"
    """torch.compile before DeepSpeed sees the model. blocks: each transformer block and head compiled on its own
    (regional; fast to compile, composes with activation checkpointing); full: the whole model; auto: blocks on
    CUDA below ZeRO-3, none on CPU and under ZeRO-3 (whose parameter hooks break compiled graphs)."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager compiles quickly and is used by CPU smoke runs)."""

    def __post_init__(self):
        self.resolve()  # the registry checks the name and every architecture rule now, not after workers start

    def arch_overrides(self) -> dict[str, Any]:
        """The architecture fields set here (keyword arguments of igscale.models.build_model)."""
        return {k: getattr(self, k) for k in MODEL_ARCH_FIELDS if getattr(self, k) is not None}

    def resolve(self):
        """The full igscale.models.ModelConfig: the registry preset with this section's fields on top."""
        from igscale.models.registry import model_config  # config sits above models; imported here (torch)

        try:
            return model_config(self.name, **self.arch_overrides())
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("ModelConfig: ")) from None


# ModelSection fields that describe the network itself (the rest say how it runs)
MODEL_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSection)
                          if f.name not in ("name", "activation_checkpointing", "compile", "compile_backend"))


@dataclass(kw_only=True)
class DataSection:
    manifest_url: str = ""
    """URL of the latent-shard manifest written by data_pipeline (s3://..., file://... or a local path)."""
    endpoint_url: str | None = None
    """S3 endpoint; None reads S3_ENDPOINT_URL from the environment."""
    num_workers: int = 2
    """Loader workers per rank (0: read in the training thread)."""
    worker_type: Literal["thread", "process"] = "thread"
    """thread: workers share the process (the hot path releases the GIL; no IPC copy). process: DataLoader."""
    shuffle_buffer: int = 1000
    """Samples per shuffle window (each window is emitted in a uniformly random order)."""
    finish_on: Literal["auto", "workers", "device"] = "auto"
    """Where batches are finished (the SiT-recipe posterior draw, normalisation to float32): in the loader
    workers (CPU) or on the training device after the copy. auto: the device when it is a GPU."""
    on_corrupt: Literal["raise", "skip"] = "raise"

    def __post_init__(self):
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("num_workers must be >= 0 and shuffle_buffer >= 1")


@dataclass(kw_only=True)
class LossSection:
    path: Literal["linear", "cosine"] = "linear"
    aux_weight: float = 0.5
    """Weight of the IG auxiliary (intermediate-head) loss; 0.5 in both official trainers."""
    cosine_loss: bool = False
    """LightningDiT's extra channel-cosine loss on D_f."""
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"
    """uniform (both official recipes) or logit_normal(t_mean, t_std) (SiT's `lognormal` weighting)."""
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0
    label_dropout: float = 0.1
    """Probability of replacing a label with the null class (drawn from the run's own RNG stream)."""

    def __post_init__(self):
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.aux_weight < 0:
            raise ValueError("aux_weight must be >= 0")
        if not (self.t_std > 0 and self.t_shift > 0):
            raise ValueError(f"t_std and t_shift must be > 0, got {self.t_std}, {self.t_shift}")


@dataclass(kw_only=True)
class OptimSection:
    name: Literal["adamw", "fused_adam", "cpu_adam", "muon"] = "adamw"
    """adamw: torch AdamW (fused on CUDA); fused_adam: DeepSpeed FusedAdam; cpu_adam: DeepSpeed CPU-offload Adam;
    muon: Muon on >=2-D weights + Adam on the rest (LightningDiT+IG recipe)."""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps, then constant."""
    muon_lr: float = 2e-4
    muon_weight_decay: float = 0.01
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5

    def __post_init__(self):
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ValueError("learning rates must be > 0")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if not (all(0.0 <= b < 1.0 for b in self.betas) and 0.0 <= self.muon_momentum < 1.0):
            raise ValueError(f"betas and muon_momentum must be in [0, 1), got {self.betas}, {self.muon_momentum}")
        if self.eps <= 0 or self.weight_decay < 0 or self.muon_weight_decay < 0 or self.muon_ns_steps < 1:
            raise ValueError("eps must be > 0, weight decays >= 0 and muon_ns_steps >= 1")


@dataclass(kw_only=True)
class EngineSection:
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16", "bf16_autocast"] = "bf16"
    """bf16/fp16: DeepSpeed low-precision weights with fp32 master copy; bf16_autocast: fp32 weights, bf16 matmuls."""
    grad_accum: int = 1
    grad_clip: float = 1.0
    tf32: bool = True
    offload_optimizer: bool = False
    """ZeRO optimizer-state offload to CPU (use with optim.name=cpu_adam)."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")
        if self.grad_clip < 0:
            raise ValueError("grad_clip must be >= 0 (0 disables clipping)")


@dataclass(kw_only=True)
class TrainSection:
    global_batch: int = 256
    """Images per optimizer step across all ranks (= micro_batch * grad_accum * world)."""
    total_steps: int = 0
    """Stop after this many optimizer steps; 0 means use `epochs`."""
    epochs: float = 0.0
    """Run length in passes over the manifest's samples (used when total_steps is 0)."""
    seed: int = 0
    ema_decay: float = 0.9999
    max_nonfinite: int = 20
    """NaN/Inf losses skip their step; after this many skipped steps the run checkpoints and stops."""

    def __post_init__(self):
        if self.global_batch < 1:
            raise ValueError("global_batch must be >= 1")
        if self.total_steps < 0 or self.epochs < 0 or self.seed < 0:
            raise ValueError("total_steps, epochs and seed must be >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.max_nonfinite < 0:
            raise ValueError(f"max_nonfinite must be >= 0, got {self.max_nonfinite}")


@dataclass(kw_only=True)
class CheckpointSection:
    url: str = ""
    """Where checkpoints go (s3://bucket/prefix or a local folder); defaults to <run_dir>/checkpoints."""
    every_steps: int = 50_000
    keep_last: int = 2
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    staging_dir: str = ""
    """Local folder for writing before upload; defaults to <run_dir>/staging."""
    resume: bool = True
    """Resume from the `latest` pointer if one exists."""
    allow_config_change: bool = False
    """Resume even if the model, loss or data-order fields differ from the checkpoint's config (the changes are
    logged and appended to <run_dir>/config_changes.jsonl); otherwise such a resume is refused."""

    def __post_init__(self):
        if self.every_steps < 1 or self.keep_last < 1 or self.keep_every < 0:
            raise ValueError("every_steps and keep_last must be >= 1, keep_every >= 0")


@dataclass(kw_only=True)
class SampleSection:
    every_steps: int = 100_000
    """Write IG-on / IG-off sample grids to TensorBoard every this many steps (0: never)."""
    num: int = 8
    num_steps: int = 50
    method: Literal["euler", "heun", "sde"] = "euler"
    w_cfg: float = 1.0
    w_ig: float = 1.4
    seed: int = 0

    def __post_init__(self):
        # checked now: a bad value would otherwise fail only when the first grid is drawn, maybe 100k steps in
        if self.every_steps < 0 or self.num < 1 or self.num_steps < 1 or self.seed < 0:
            raise ValueError(f"every_steps must be >= 0 (0: never), num and num_steps >= 1, seed >= 0; got "
                             f"every_steps={self.every_steps}, num={self.num}, num_steps={self.num_steps}, "
                             f"seed={self.seed}")
        if not (math.isfinite(self.w_cfg) and math.isfinite(self.w_ig)):
            raise ValueError(f"w_cfg and w_ig must be finite, got {self.w_cfg}, {self.w_ig}")


@dataclass(kw_only=True)
class LoggingSection:
    every_steps: int = 100
    tensorboard: bool = True
    peak_tflops: float = 0.0
    """Per-device peak for the MFU estimate; 0 picks a known value for the GPU (or none on CPU)."""
    sample_keys: bool = False
    """Audit the data order: each rank appends every step's sample keys to <run_dir>/sample_keys/rank*.jsonl."""

    def __post_init__(self):
        if self.every_steps < 1 or self.peak_tflops < 0:
            raise ValueError(f"every_steps must be >= 1 and peak_tflops >= 0, got {self.every_steps}, "
                             f"{self.peak_tflops}")


@dataclass(kw_only=True)
class RunConfig:
    run_dir: str = "runs/default"
    """Local folder for the resolved config, TensorBoard events and staging."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    engine: EngineSection = field(default_factory=EngineSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    sample: SampleSection = field(default_factory=SampleSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self):
        if self.optim.name == "muon" and self.engine.precision not in MUON_PRECISIONS:
            raise ValueError(
                f"optim.name=muon needs engine.precision in {list(MUON_PRECISIONS)}, got {self.engine.precision!r}: "
                "DeepSpeed's bf16/fp16 optimizers flatten the weights into low-precision groups, where Muon's "
                "matrix orthogonalisation cannot run (bf16_autocast trains in bf16 with fp32 weights)"
            )
        if self.optim.name == "muon" and self.engine.offload_optimizer:
            raise ValueError("optim.name=muon keeps its state on the device (zero_stage 1-3 shard it over the ranks): "
                             "set engine.offload_optimizer=false")
        if self.optim.name == "cpu_adam" and not self.engine.offload_optimizer:
            raise ValueError("optim.name=cpu_adam needs engine.offload_optimizer=true (and zero_stage >= 1)")
        if self.engine.offload_optimizer and self.engine.zero_stage == 0:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage >= 1")

    def micro_batch(self, world_size: int) -> int:
        """Per-rank batch of one forward pass; global_batch must split evenly."""
        denom = world_size * self.engine.grad_accum
        if self.train.global_batch % denom:
            raise ValueError(
                f"train.global_batch={self.train.global_batch} is not divisible by world_size*grad_accum={denom}"
            )
        return self.train.global_batch // denom

    def replace(self, **kw) -> RunConfig:
        return dataclasses.replace(self, **kw)
