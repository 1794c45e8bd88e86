"""`ruff check .` is clean (config in ruff.toml): run in the suite so CI enforces it."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_shell_scripts_parse():
    for script in ("launch/setup_env.sh", "launch/submit.sh", ".ci/run", ".ci/system_deps.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"
