"""`igscale train --config configs/<run>.yaml [key=value ...]`: train a model with DeepSpeed from a YAML run config.

Launch with torchrun, the deepspeed launcher, srun or Ray Train (rank/world come from the launcher's env). The
config is resolved and validated before the process group or any worker starts, and saved with the run. Exit codes:
0 finished, 2 bad config, 3 too many non-finite losses (checkpointed), 75 preempted (checkpointed; requeue).
"""
from __future__ import annotations

import argparse
import os
import sys

from igscale.config.load import load_config, save_config
from igscale.core.typed import ConfigError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="igscale train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the resolved config and what a start would do with the run's checkpoints")
    p.add_argument("--world-size", type=int, default=0,
                   help="with --dry-run: plan the resume for this many ranks (default: the launcher's, else 1)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if model/loss/data-order settings differ from the checkpoint's (recorded)")
    p.add_argument("--ray-workers", type=_workers, default=0,
                   help="launch through Ray Train (TorchTrainer) with this many workers instead of torchrun/srun; "
                        "auto: as many as the cluster has slots for (GPUs, or CPUs / --ray-cpus-per-worker) and the "
                        "global batch splits over, counted again at every restart")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address for --ray-workers (default: RAY_ADDRESS, e.g. inside `ray job submit`)")
    p.add_argument("--ray-max-failures", type=int, default=0,
                   help="worker-group restarts (each resumes from `latest`) before failing: Ray Train's "
                        "FailureConfig, or with --ray-workers auto the driver's own, each on the cluster as it is then")
    p.add_argument("--ray-cpus-per-worker", type=float, default=1.0)
    p.add_argument("--ray-use-gpu", choices=["auto", "yes", "no"], default="auto",
                   help="one GPU per Ray worker (NCCL); auto: if this driver sees CUDA")
    p.add_argument("--ray-storage-path", default=None, help="Ray Train run storage (default: <run_dir>/ray)")
    p.add_argument("--ray-name", default=None, help="Ray Train run name (default: basename of run_dir)")
    p.add_argument("overrides", nargs="*", help="typed dotted overrides, e.g. train.global_batch=512")
    return p


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of workers or 'auto', got {value!r}") from None


def auto_workers(resources: dict, *, use_gpu: bool, cpus_per_worker: float, round_size: int) -> int:
    """Ray Train workers for --ray-workers auto: the cluster's worker slots, lowered to a count the round
    (global_batch / grad_accum samples) splits over. Raises ValueError when the cluster has no slot."""
    slots = int(resources.get("GPU", 0)) if use_gpu else int(resources.get("CPU", 0) // cpus_per_worker)
    if slots < 1:
        raise ValueError(f"the Ray cluster has no worker slot ({'GPUs' if use_gpu else 'CPUs'}: {resources})")
    return next(n for n in range(min(slots, round_size), 0, -1) if round_size % n == 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides + (["checkpoint.allow_config_change=true"]
                                                         if args.allow_config_change else []))
        if not cfg.data.manifest_url and not args.dry_run:
            raise ConfigError("data.manifest_url is empty: point it at a latent manifest (s3://... or a path)")
    except ConfigError as e:
        print(f"igscale train: invalid config: {e}", file=sys.stderr)
        return 2
    if args.world_size < 0:
        print("igscale train: --world-size must be >= 1 (0: the launcher's)", file=sys.stderr)
        return 2
    if (args.ray_workers != "auto" and args.ray_workers < 0) or args.ray_max_failures < 0:
        print("igscale train: --ray-workers and --ray-max-failures must be >= 0", file=sys.stderr)
        return 2
    if args.dry_run:
        from igscale.config.load import config_to_yaml
        from igscale.distributed.env import detect_env

        print(config_to_yaml(cfg), end="")
        try:
            world = args.world_size or detect_env().world_size
        except ValueError as e:  # inconsistent launcher variables
            print(f"igscale train: {e}", file=sys.stderr)
            return 2
        print(f"# {resume_plan(cfg, world)}")
        return 0
    if args.ray_workers:
        return _ray_launch(cfg, args)
    return _run(cfg)


def _ray_worker(config: dict) -> None:
    """Ray Train worker: Ray has set RANK/WORLD_SIZE/LOCAL_RANK and created the process group."""
    code = _run(_cfg_from(config))
    if code != 0:
        raise RuntimeError(f"igscale train worker exited with code {code}")


def _cfg_from(config: dict):
    from igscale.config.load import config_from_dict

    return config_from_dict(config["run_config"])


def _ray_launch(cfg, args) -> int:
    """Driver for Ray Train: the validated config is shipped to every worker as a plain dict."""
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from igscale.core.typed import to_dict

    cfg = cfg.replace(run_dir=os.path.abspath(cfg.run_dir))  # Ray workers run in their own working directories
    # Workers need the S3 endpoint/credentials of the submitting shell; values are passed, never printed.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "S3_"))}
    # Inside `ray job submit` the job's runtime env already carries these variables: let Ray merge the two.
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
             log_to_driver=True, runtime_env={"env_vars": env_vars})
    use_gpu = torch.cuda.is_available() if args.ray_use_gpu == "auto" else args.ray_use_gpu == "yes"
    auto = args.ray_workers == "auto"
    name = args.ray_name or os.path.basename(cfg.run_dir.rstrip("/")) or "igscale-train"
    for attempt in range(args.ray_max_failures + 1 if auto else 1):
        workers = args.ray_workers
        if auto:  # the cluster as it is now: a restart after a node loss (or gain) runs at the new size
            workers = auto_workers(ray.cluster_resources(), use_gpu=use_gpu, cpus_per_worker=args.ray_cpus_per_worker,
                                   round_size=cfg.train.global_batch // cfg.engine.grad_accum)
            print(f"igscale train: Ray Train attempt {attempt + 1}: {workers} worker(s) for the cluster's "
                  f"{'GPUs' if use_gpu else 'CPUs'}", flush=True)
        trainer = TorchTrainer(
            _ray_worker, train_loop_config={"run_config": to_dict(cfg)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": args.ray_cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=args.ray_storage_path or os.path.join(cfg.run_dir, "ray"),
                                 failure_config=FailureConfig(max_failures=0 if auto else args.ray_max_failures)),
        )
        try:
            trainer.fit()
            break
        except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; the message names the worker exit code
            err = e
            print(f"igscale train: Ray Train attempt {attempt + 1} failed: {str(e)[:500]}", file=sys.stderr)
    else:
        print(f"igscale train: Ray Train run failed after up to {args.ray_max_failures} restarts: {err}",
              file=sys.stderr)
        return 1
    print(f"igscale train: finished; checkpoints at {cfg.checkpoint.url or os.path.join(cfg.run_dir, 'checkpoints')}")
    return 0


def _run(cfg) -> int:
    import torch.distributed as dist

    from igscale.checkpoint.store import Checkpointer
    from igscale.distributed.engine import init_deepspeed_distributed
    from igscale.distributed.env import barrier, destroy_distributed, detect_env, device_for, init_distributed
    from igscale.models.flops import train_flops_per_image
    from igscale.monitor.metrics import MetricsSink, peak_flops
    from igscale.ops.attention import attention_kind
    from igscale.training.build import build_engine
    from igscale.training.loop import EXIT_OK, Trainer
    from igscale.training.samples import make_sample_fn

    owns_group = not dist.is_initialized()  # Ray Train creates (and later destroys) its own group
    env = init_distributed(detect_env())
    rank, world = env.rank, env.world_size
    device = device_for(env)
    init_deepspeed_distributed()
    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    metrics = None
    try:
        model_config = cfg.model.resolve()  # checks the data against the model before DeepSpeed starts
        loader = make_loader(cfg, rank, world, device)
        if tuple(loader.latent_shape) != tuple(model_config.latent_shape):
            raise ConfigError(f"data latents have shape {tuple(loader.latent_shape)} but model "
                              f"{cfg.model.name} expects {tuple(model_config.latent_shape)}")
        data_classes = (getattr(loader, "manifest", None) or {}).get("source", {}).get("num_classes")
        if data_classes is not None and int(data_classes) > model_config.num_classes:
            # label num_classes is the null (CFG) token: the extra classes would silently train as "no class"
            raise ConfigError(f"the data has {data_classes} classes but model {cfg.model.name} has num_classes="
                              f"{model_config.num_classes}; set model.num_classes={data_classes}")
        engine, compile_mode = build_engine(cfg, world_size=world, device=device)
        model_config = engine.module.config
        ckpt = Checkpointer(cfg.checkpoint.url or os.path.join(run_dir, "checkpoints"),
                            cfg.checkpoint.staging_dir or os.path.join(run_dir, "staging"), rank=rank,
                            world_size=world, keep_last=cfg.checkpoint.keep_last,
                            keep_every=cfg.checkpoint.keep_every, endpoint_url=cfg.data.endpoint_url)
        metrics = MetricsSink(os.path.join(run_dir, "tensorboard"), enabled=rank == 0,
                              tensorboard=cfg.logging.tensorboard,
                              flops_per_image=train_flops_per_image(model_config),
                              peak=peak_flops(cfg.logging.peak_tflops), world_size=world,
                              jsonl=os.path.join(run_dir, "train_log.jsonl"))
        sampler = make_sample_fn(cfg, model_config, device) if rank == 0 and cfg.sample.every_steps else None
        if rank == 0:
            print(f"igscale train: {world} rank(s) on {device.type}; compile={compile_mode}"
                  f"{f' ({cfg.model.compile_backend})' if compile_mode != 'none' else ''}, attention="
                  f"{attention_kind(device)}, optimizer={type(engine.client_optimizer).__name__}"
                  f"{' (skips non-finite steps on the device)' if engine.device_skip else ' (host-checked skips)'}, "
                  f"tf32={'on' if cfg.engine.tf32 and device.type == 'cuda' else 'off'}", flush=True)
        trainer = Trainer(cfg, engine, loader, ckpt, metrics, rank=rank, world_size=world, device=device,
                          num_samples=getattr(loader, "num_samples", None), sampler=sampler)
        trainer.install_signal_handlers()
        code = trainer.run()
        if code == EXIT_OK:
            _export(trainer, model_config, ckpt, rank)
            # no rank tears its process group down while rank 0 is still writing the export: an asymmetric gloo
            # teardown can abort the early rank at exit ("terminate called without an active exception")
            barrier()
        return code
    except ConfigError as e:
        print(f"igscale train: invalid config: {e}", file=sys.stderr)
        return 2
    finally:
        if metrics is not None:  # flush TensorBoard and the jsonl log on every exit path, errors included
            metrics.close()
        if owns_group:
            destroy_distributed()


def resume_plan(cfg, world: int) -> str:
    """One line on what a start at `world` ranks does with the run's checkpoints (reads only their records)."""
    import tempfile

    from igscale.checkpoint import universal
    from igscale.checkpoint.store import Checkpointer

    url = cfg.checkpoint.url or os.path.join(cfg.run_dir, "checkpoints")
    try:
        cfg.micro_batch(world)
    except ValueError as e:
        return f"cannot start at world size {world}: {e}"
    if not cfg.checkpoint.resume:
        return f"starts at step 0 on {world} rank(s) (checkpoint.resume=false)"
    fresh = f"no checkpoint at {url}: starts at step 0 on {world} rank(s)"
    if "://" not in url and not os.path.isdir(url):
        return fresh
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ck = Checkpointer(url, tmp, endpoint_url=cfg.data.endpoint_url)
            tag = ck.latest_tag()
            if tag is None:
                return fresh
            meta = ck.read_meta(tag)
            saved, step = int(meta.get("world_size", world)), meta.get("step")
            if saved == world:
                return f"resuming {url}/{tag} (step {step}) at world size {world}, as saved: an exact resume"
            if not universal.needs_conversion(ck.verify(tag)):
                how = "no ZeRO partitions, loaded as saved"
            elif ck.folder_meta(tag, universal.NAME) is not None:
                how = f"DeepSpeed's universal checkpoint, cached at {url}/{tag}/{universal.NAME}"
            else:
                how = "DeepSpeed's universal checkpoint, converted once by rank 0 and cached next to the tag"
            return (f"resuming at world size {world} from a checkpoint saved at world size {saved} ({url}/{tag}, "
                    f"step {step}): weights and optimizer state through {how}; the EMA re-sharded; the data "
                    "continue from the same global sample position")
    except Exception as e:  # noqa: BLE001 - a dry run reports, it does not fail on storage
        return f"could not read the checkpoints at {url}: {type(e).__name__}: {e}"


def make_loader(cfg, rank: int, world: int, device):
    """The training loader of `igscale train`: the run's data position survives a change of world size."""
    from igscale.latents.elastic import ElasticLoader

    return ElasticLoader(cfg.data.manifest_url, batch_size=cfg.micro_batch(world), rank=rank, world_size=world,
                         num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, endpoint_url=cfg.data.endpoint_url,
                         on_corrupt=cfg.data.on_corrupt, worker_type=cfg.data.worker_type,
                         return_keys=cfg.logging.sample_keys,
                         finish_on=(("device" if device.type == "cuda" else "workers")
                                    if cfg.data.finish_on == "auto" else cfg.data.finish_on))


def _export(trainer, model_config, ckpt, rank: int) -> None:
    """Final inference export (EMA weights + model config) next to the checkpoints: <checkpoint url>/export."""
    from igscale.eval.export_io import save_export
    from igscale.models import build_model_from_config

    sd = trainer.ema_full_state_dict()  # collective
    if rank == 0:
        model = build_model_from_config(model_config)
        model.load_state_dict(sd)
        url = ckpt.url.rstrip("/") + "/export"
        save_export(model, url)
        print(f"inference export written to {url}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
