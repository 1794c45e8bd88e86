"""Ray Train entry: `igscale train` on N Ray workers (TorchTrainer), DeepSpeed inside each worker.

    python launch/ray_train.py --workers 8 --use-gpu --max-failures 3 --config configs/sit_xl2_ig.yaml key=value ...

Normally started on the cluster by `launch/ray_submit.py train` (a `ray job submit` entrypoint). TorchTrainer
creates the process group and exports RANK/WORLD_SIZE/LOCAL_RANK; each worker then runs the unchanged
`igscale train` composition root, which wraps the model in DeepSpeed and resumes from the `latest` checkpoint of
`checkpoint.url`. When a worker dies (node loss, OOM, a killed process), Ray Train's FailureConfig restarts the
whole worker group, up to --max-failures times, and every restarted worker resumes from that last complete
checkpoint. Put `checkpoint.url` on storage every node sees (s3://...). Exit code: 0 finished, 2 bad config,
1 the run failed more often than --max-failures allows.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray_train.py", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="training processes (Ray Train workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL); default CPU workers (gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before the run fails")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train run storage (default: <run_dir>/ray); igscale's own checkpoints go to checkpoint.url")
    p.add_argument("--name", default=None, help="Ray Train run name (default: basename of run_dir)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    return p


def _train_worker(loop_config: dict) -> None:
    """Runs inside each Ray Train worker (rank/world and the process group come from TorchTrainer)."""
    from igscale.cli import train as train_cli

    code = train_cli.main(["--config", loop_config["config"], *loop_config["overrides"]])
    if code != 0:
        # An exception marks the worker failed: Ray Train restarts the group (FailureConfig), which resumes.
        raise RuntimeError(f"igscale train exited with code {code} on rank {os.environ.get('RANK')}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from igscale.config.load import load_config
    from igscale.config.typed import ConfigError

    try:  # validate on the driver, before any worker starts
        cfg = load_config(args.config, args.overrides)
        if not cfg.data.manifest_url:
            raise ConfigError("data.manifest_url is empty: point it at a latent manifest (s3://... or a path)")
    except ConfigError as e:
        print(f"ray_train.py: invalid config: {e}", file=sys.stderr)
        return 2
    if args.workers < 1 or args.max_failures < 0:
        print("ray_train.py: --workers must be >= 1 and --max-failures >= 0", file=sys.stderr)
        return 2

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = os.path.abspath(cfg.run_dir)
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    trainer = TorchTrainer(
        _train_worker,
        # absolute config path: workers may start in another directory than this driver
        train_loop_config={"config": os.path.abspath(args.config), "overrides": [*args.overrides, f"run_dir={run_dir}"]},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name=args.name or os.path.basename(run_dir.rstrip("/")) or "igscale",
                             storage_path=args.storage_path or os.path.join(run_dir, "ray"),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001  (TrainingFailedError and friends: report, exit non-zero)
        print(f"ray_train.py: training failed after up to {args.max_failures} restarts: {e}", file=sys.stderr)
        return 1
    print(f"ray_train.py: training finished; checkpoints at {cfg.checkpoint.url or os.path.join(run_dir, 'checkpoints')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
