"""Run a benchmark's own worker mode under torchrun on loopback and return its stdout (one helper for the benches)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script: str, nproc: int, *args: str) -> str:
    """`torchrun --nproc_per_node nproc script --worker args...` with the CPUs split between the ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={port}", os.path.abspath(script), "--worker", *args], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"worker failed:\n{(r.stdout + r.stderr)[-5000:]}")
    return r.stdout
