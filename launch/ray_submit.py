"""Submit igscale jobs to a Ray cluster with `ray job submit`: precompute, train, sample, eval.

    python launch/ray_submit.py --address http://HEAD:8265 precompute -- --input s3://b/imgs --output s3://b/lat ...
    python launch/ray_submit.py --address http://HEAD:8265 train --workers 8 --use-gpu -- --config configs/x.yaml k=v
    python launch/ray_submit.py --address http://HEAD:8265 sample -- <igscale sample args>
    python launch/ray_submit.py --address http://HEAD:8265 eval -- <igscale eval args>

Arguments after `--` go to the job's command: `python -m data_pipeline.run`, `launch/ray_train.py` (Ray Train
TorchTrainer with DeepSpeed, FailureConfig restarts), `python -m igscale.cli.main sample|eval`. The job metadata
records the command, its arguments and, for train, the resolved config (`ray job list` / the dashboard show it).
The job inherits the cluster nodes' environment; `--pass-env NAME` copies a variable from this shell into the
job's runtime env (AWS_ENDPOINT_URL and AWS_DEFAULT_REGION are copied when set). Credentials are copied only with
`--pass-credentials`, because a runtime env is visible to everyone who can read the cluster's dashboard; they are
never printed. Waits for the job and exits 0 only if it SUCCEEDED (`--no-wait` returns after submission).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMMANDS = ("precompute", "train", "sample", "eval")
DEFAULT_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "S3_ENDPOINT_URL")
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray_submit.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                   help="Ray dashboard / job API address, e.g. http://127.0.0.1:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--python", default="python", help="python on the cluster nodes (default: `python` on PATH)")
    p.add_argument("--working-dir", default=None,
                   help="upload this directory as the job's working dir (remote clusters without igscale installed); "
                        "default: run in place (local cluster, or the Docker image where the repo is at the same path)")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--pass-env", action="append", default=[], metavar="NAME")
    p.add_argument("--pass-credentials", action="store_true", help="copy AWS credentials into the job's runtime env")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--timeout", type=float, default=0, help="fail if the job has not ended after this many seconds")
    p.add_argument("--workers", default="2", help="train: Ray Train workers, or auto (the cluster's slots at every "
                                                   "restart)")
    p.add_argument("--use-gpu", action="store_true", help="train: one GPU per worker")
    p.add_argument("--max-failures", type=int, default=3, help="train: worker-group restarts (FailureConfig)")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the job (after --)")
    return p


def _entry(args, rest: list[str]) -> tuple[list[str], dict]:
    """The job's command line and the metadata recording what it runs."""
    meta = {"igscale_command": args.command, "igscale_args": json.dumps(rest)}
    if args.command == "precompute":
        return [args.python, "-m", "data_pipeline.run", *rest], meta
    if args.command in ("sample", "eval"):
        return [args.python, "-m", "igscale.cli.main", args.command, *rest], meta
    # train: validate and record the resolved config here, before anything is submitted
    from igscale.config.load import load_config
    from igscale.core.typed import ConfigError, to_dict

    cfg_args = argparse.ArgumentParser(add_help=False)
    cfg_args.add_argument("--config", required=True)
    known, overrides = cfg_args.parse_known_args(rest)
    try:
        cfg = load_config(known.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"ray_submit.py: invalid train config: {e}") from None
    meta["config"] = json.dumps(to_dict(cfg), sort_keys=True)
    meta["run_dir"] = cfg.run_dir
    meta["checkpoint_url"] = cfg.checkpoint.url
    script = os.path.relpath(os.path.join(HERE, "ray_train.py"), args.working_dir) if args.working_dir \
        else os.path.join(HERE, "ray_train.py")
    config = os.path.relpath(os.path.abspath(known.config), args.working_dir) if args.working_dir \
        else os.path.abspath(known.config)
    return [args.python, script, f"--workers={args.workers}", f"--max-failures={args.max_failures}",
            *(["--use-gpu"] if args.use_gpu else []), "--config", config, *overrides], meta


def _ray() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "ray")
    return cand if os.path.exists(cand) else (shutil.which("ray") or "ray")


def job_status(address: str, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(sid).value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.address:
        print("ray_submit.py: error: no cluster address: pass --address http://HEAD:8265 or set "
              "RAY_API_SERVER_ADDRESS", file=sys.stderr)
        return 2
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    entry, meta = _entry(args, rest)
    sid = args.submission_id or f"igscale-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    env_vars = {k: os.environ[k] for k in (*DEFAULT_ENV, *args.pass_env) if k in os.environ}
    if args.pass_credentials:
        env_vars.update({k: os.environ[k] for k in CREDENTIALS if k in os.environ})
    runtime_env: dict = {"env_vars": env_vars} if env_vars else {}
    cmd = [_ray(), "job", "submit", "--address", args.address, "--submission-id", sid,
           "--metadata-json", json.dumps(meta), "--no-wait"]
    if args.working_dir:
        cmd += ["--working-dir", args.working_dir]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    cmd += ["--", *entry]
    print(f"ray_submit.py: submitting {sid}: {' '.join(entry)} (env passed: {sorted(env_vars)})", flush=True)
    sub = subprocess.run(cmd, capture_output=True, text=True)
    if sub.returncode != 0:
        print(f"ray_submit.py: `ray job submit` failed ({sub.returncode}):\n{sub.stdout}\n{sub.stderr}", file=sys.stderr)
        return 1
    print(f"submission_id={sid}", flush=True)
    if args.no_wait:
        return 0
    # Stream the job's logs until it ends, then ask its final status.
    logs = subprocess.Popen([_ray(), "job", "logs", "--address", args.address, "--follow", sid])
    try:
        logs.wait(args.timeout or None)
    except subprocess.TimeoutExpired:
        logs.terminate()
        logs.wait(10)
        subprocess.run([_ray(), "job", "stop", "--address", args.address, "--no-wait", sid], capture_output=True)
        print(f"ray_submit.py: job {sid} still running after {args.timeout}s; stop requested", file=sys.stderr)
        return 1
    status = job_status(args.address, sid)
    deadline = time.monotonic() + 30
    while status in ("RUNNING", "PENDING") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = job_status(args.address, sid)
    print(f"ray_submit.py: job {sid} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
