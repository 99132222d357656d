#!/usr/bin/env bash
# Install the system packages the project needs (Debian/Ubuntu). `--test` adds what the test suite drives:
# headless Chromium, podman (the container engine for the container tests), debootstrap (their base image), and
# Slurm with munge (tests/slurm_fixtures.py starts a one-node cluster of its own from them), rclone + fuse3 (the
# EBRAINS Drive mount, tests/integration/test_drive*.py).
set -euo pipefail
want=(python3 python3-venv python3-dev git make gcc)
command -v node >/dev/null && command -v npm >/dev/null || want+=(nodejs npm)
if [ "${1:-}" = "--test" ]; then want+=(chromium podman runc debootstrap slurm-wlm munge rclone fuse3); fi
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "[system-deps] installing: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO=sudo; else
    echo "Please install these packages as root: apt-get install -y ${missing[*]}" >&2; exit 1
  fi
fi
${SUDO:-} apt-get update -q
DEBIAN_FRONTEND=noninteractive ${SUDO:-} apt-get install -y -q --no-install-recommends "${missing[@]}"
