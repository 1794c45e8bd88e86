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
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray_train.py", description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="2",
                   help="training processes (Ray Train workers), or auto: as many as the cluster has slots for, "
                        "counted again at every restart (a changed cluster resumes at its new size)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL); default CPU workers (gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before the run fails")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train run storage (default: <run_dir>/ray); igscale's own checkpoints go to checkpoint.url")
    p.add_argument("--name", default=None, help="Ray Train run name (default: basename of run_dir)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    """Forward to `igscale train --ray-workers N` (the one Ray Train launcher; it validates the config first)."""
    args = build_parser().parse_args(argv)
    if args.workers != "auto" and not (args.workers.isdigit() and int(args.workers) >= 1):
        print(f"ray_train.py: --workers must be >= 1 or auto, got {args.workers!r}", file=sys.stderr)
        return 2
    from igscale.cli import train as train_cli

    fwd = ["--config", args.config, "--ray-workers", args.workers, "--ray-max-failures", str(args.max_failures),
           "--ray-cpus-per-worker", str(args.cpus_per_worker), "--ray-use-gpu", "yes" if args.use_gpu else "no"]
    if args.storage_path:
        fwd += ["--ray-storage-path", args.storage_path]
    if args.name:
        fwd += ["--ray-name", args.name]
    return train_cli.main([*fwd, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
