#!/usr/bin/env bash
# System packages for building and running the project's images on podman (hosts without Docker Engine, e.g. CI):
# podman (serves the Docker API), runc (crun fails on these hosts), debootstrap (the base image; no registry is
# reachable). Idempotent: installs only what is missing. Debian/Ubuntu, as root (or with sudo).
set -euo pipefail
want=(podman runc debootstrap)
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "[images/podman] installing: ${missing[*]}"
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "run as root: apt-get install -y ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
