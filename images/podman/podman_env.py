#!/usr/bin/env python3
"""A rootful podman environment of the project's own, serving the Docker API on a unix socket.

Used by the image tests (tests/podman_fixtures.py), by images/build.py and by hand on machines without
Docker Engine. Production uses Docker Engine; nothing here is needed there.

Everything lives under one directory (default ``$SPINNAKER_PODMAN_DIR`` or
``~/.cache/spinnaker-jupyter/podman``; outside the work tree so a fresh clone in CI reuses the image cache):

    DIR/containers.conf   runtime runc, cgroupfs, file events, netns host, default ulimits (measured: crun and
                          the machine defaults fail on these hosts)
    DIR/storage.conf      overlay storage in DIR/storage, run state in DIR/run
    DIR/tmp               libpod's tmp_dir (wiped at ``up`` when no service of ours runs: a stale one after a
                          reboot would leave containers recorded as running)
    DIR/podman.sock       the Docker-compatible API (``podman system service --time=0``)
    DIR/service.log, DIR/service.pid

The podman CLI uses the same storage with ``env CONTAINERS_CONF=DIR/containers.conf
CONTAINERS_STORAGE_CONF=DIR/storage.conf podman ...`` (``python podman_env.py shell-env`` prints these).

Commands: up (service + base image), down, status, base, shell-env, purge.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_IMAGE = "localhost/spinnaker-jupyter/debian:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
REQUIRED_TOOLS = ("podman", "runc", "debootstrap")


def default_dir() -> Path:
    env = os.environ.get("SPINNAKER_PODMAN_DIR")
    if env:
        return Path(env).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "spinnaker-jupyter" / "podman").resolve()


def log(msg: str) -> None:
    print(f"[podman-env] {msg}", file=sys.stderr, flush=True)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 5.0):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class PodmanEnv:
    """One podman environment under ``base_dir``."""

    def __init__(self, base_dir: str | os.PathLike | None = None):
        self.dir = Path(base_dir).resolve() if base_dir else default_dir()
        self.storage = self.dir / "storage"
        self.runroot = self.dir / "run"
        self.tmpdir = self.dir / "tmp"
        self.conf = self.dir / "containers.conf"
        self.storage_conf = self.dir / "storage.conf"
        self.socket_path = self.dir / "podman.sock"
        self.pidfile = self.dir / "service.pid"
        self.logfile = self.dir / "service.log"
        if len(str(self.socket_path)) > 100:
            raise ValueError(f"socket path too long for AF_UNIX: {self.socket_path}")

    # ----------------------------------------------------------------- basics
    @property
    def url(self) -> str:
        """Docker API base URL (docker-py ``base_url``, ``DOCKER_HOST``, DockerSpawner ``client_kwargs``)."""
        return f"unix://{self.socket_path}"

    @property
    def env(self) -> dict:
        """Environment for running the podman CLI against this storage."""
        env = dict(os.environ)
        env["CONTAINERS_CONF"] = str(self.conf)
        env["CONTAINERS_STORAGE_CONF"] = str(self.storage_conf)
        return env

    @staticmethod
    def missing_tools() -> list[str]:
        return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]

    def unusable_reason(self) -> str | None:
        """Why podman cannot run here (None when it can, as far as can be told without trying)."""
        missing = self.missing_tools()
        if missing:
            return (
                f"missing {', '.join(missing)}: run scripts/system-deps.sh --test "
                "(apt-get install podman runc debootstrap)"
            )
        if os.geteuid() != 0:
            return "rootful podman needs root (these tests use rootful podman with overlay storage)"
        return None

    def podman(self, *args: str, check: bool = True, capture: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", *args], env=self.env, check=check, text=True, capture_output=capture, **kw)

    def write_config(self) -> None:
        for d in (self.dir, self.storage, self.runroot, self.tmpdir):
            d.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "# written by images/podman/podman_env.py; settings measured on hosts without Docker Engine\n"
            "[containers]\n"
            'netns = "host"\n'
            'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{self.tmpdir}"\n'
            f'volume_path = "{self.storage / "volumes"}"\n'
        )
        self.storage_conf.write_text(
            "# written by images/podman/podman_env.py\n"
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.storage}"\n'
            f'runroot = "{self.runroot}"\n'
        )

    # ---------------------------------------------------------------- service
    def _service_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if b"podman" in cmdline[0] and str(self.socket_path).encode() in b" ".join(cmdline):
            return pid
        return None

    def api(self, method: str, path: str, timeout: float = 5.0):
        """One request to the Docker API; returns (status, decoded JSON or text)."""
        conn = UnixHTTPConnection(str(self.socket_path), timeout=timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read().decode()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, body

    def api_ready(self) -> bool:
        try:
            status, body = self.api("GET", "/_ping", timeout=2)
        except OSError:
            return False
        return status == 200 and str(body).strip() == "OK"

    def is_running(self) -> bool:
        return self._service_pid() is not None and self.api_ready()

    def start_service(self, timeout: float = 60.0) -> str:
        """Start ``podman system service`` (idempotent) and wait until the Docker API answers."""
        if self.is_running():
            return self.url
        reason = self.unusable_reason()
        if reason:
            raise RuntimeError(reason)
        self.write_config()
        if self._service_pid() is None:
            # No service of ours: clear run state left by a previous boot (podman then refreshes its records).
            for d in (self.runroot, self.tmpdir):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
            self.socket_path.unlink(missing_ok=True)
            if self.logfile.exists() and self.logfile.stat().st_size > 20 * 1024 * 1024:
                self.logfile.write_bytes(b"")
        started = time.monotonic()
        with open(self.logfile, "ab") as logf:
            proc = subprocess.Popen(
                ["podman", "--log-level=info", "system", "service", "--time=0", self.url],
                env=self.env,
                cwd=self.dir,  # conmon writes an empty `oom` file into its working directory at an OOM kill
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        deadline = started + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"podman service exited with {proc.returncode}; see {self.logfile}:\n"
                    + self.logfile.read_text()[-3000:]
                )
            if self.socket_path.exists() and self.api_ready():
                status, version = self.api("GET", "/version")
                log(
                    f"Docker API {version.get('ApiVersion')} (podman {version.get('Version')}) at {self.url} "
                    f"after {time.monotonic() - started:.1f}s"
                )
                return self.url
            time.sleep(0.1)
        self.stop_service()
        raise TimeoutError(f"podman service did not answer on {self.socket_path} within {timeout}s; see {self.logfile}")

    def stop_service(self, timeout: float = 20.0) -> None:
        pid = self._service_pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            try:  # reap if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        self.socket_path.unlink(missing_ok=True)
        log("podman service stopped")

    # ------------------------------------------------------------------ images
    def image_exists(self, name: str) -> bool:
        return self.podman("image", "exists", name, check=False).returncode == 0

    def build_base_image(
        self, name: str = BASE_IMAGE, suite: str = DEBIAN_SUITE, mirror: str = DEBIAN_MIRROR, force: bool = False
    ) -> str:
        """A Debian minbase image made with debootstrap + podman import (no registry is reachable here).

        Cached: nothing is done when ``name`` exists (unless ``force``)."""
        if not force and self.image_exists(name):
            log(f"base image {name} present (cached)")
            return name
        reason = self.unusable_reason()
        if reason:
            raise RuntimeError(reason)
        self.write_config()
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=self.dir))
        rootfs = work / "rootfs"
        try:
            log(f"debootstrap --variant=minbase {suite} from {mirror} ...")
            subprocess.run(
                ["debootstrap", "--variant=minbase", suite, str(rootfs), mirror], check=True, stdout=subprocess.DEVNULL
            )
            t1 = time.monotonic()
            log(f"debootstrap done in {t1 - t0:.0f}s")
            # Like the official debian images: full sources, no caches, apt keeps no downloaded .debs.
            (rootfs / "etc/apt/sources.list").write_text(
                f"deb {mirror} {suite} main\n"
                f"deb {mirror} {suite}-updates main\n"
                f"deb {mirror.replace('/debian', '/debian-security')} {suite}-security main\n"
            )
            (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(
                'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n'
            )
            (rootfs / "etc/apt/apt.conf.d/docker-no-recommends").write_text(
                'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
            )
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (rootfs / sub).glob("*"):
                    if p.is_file():
                        p.unlink()
            for p in (rootfs / "var/log").rglob("*"):
                if p.is_file():
                    p.write_bytes(b"")
            tar = work / "rootfs.tar"
            subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
            log(f"importing as {name} ...")
            self.podman(
                "import",
                "--change",
                'CMD ["/bin/bash"]',
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--message",
                f"debootstrap --variant=minbase {suite} {mirror}",
                str(tar),
                name,
            )
            log(
                f"base image {name} built in {time.monotonic() - t0:.0f}s "
                f"(debootstrap {t1 - t0:.0f}s, import {time.monotonic() - t1:.0f}s)"
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return name

    # -------------------------------------------------------------- lifecycle
    def up(self, base: bool = True, timeout: float = 60.0) -> str:
        url = self.start_service(timeout=timeout)
        if base:
            self.build_base_image()
        return url

    def down(self) -> None:
        self.stop_service()

    def purge(self) -> None:
        """Stop the service and delete everything (images included)."""
        self.stop_service()
        if self.storage.exists():
            # overlay mounts of still-existing containers must go before the directory can
            self.podman("system", "reset", "--force", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        log(f"removed {self.dir}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dir", help="environment directory (default: $SPINNAKER_PODMAN_DIR or ~/.cache/spinnaker-jupyter/podman)"
    )
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the API (default 60)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start the API service (if not running) and build the base image (if missing)")
    sub.add_parser("service", help="start the API service only")
    sub.add_parser("down", help="stop the API service")
    sub.add_parser("status", help="print whether the service answers; exit 1 if not")
    b = sub.add_parser("base", help="build the debootstrap base image (cached)")
    b.add_argument("--force", action="store_true", help="rebuild even when it exists")
    sub.add_parser("shell-env", help="print export lines for the podman CLI and docker clients")
    sub.add_parser("purge", help="stop and delete the whole environment, images included")
    args = ap.parse_args(argv)
    env = PodmanEnv(args.dir)
    if args.cmd == "up":
        print(env.up(timeout=args.timeout))
    elif args.cmd == "service":
        print(env.start_service(timeout=args.timeout))
    elif args.cmd == "down":
        env.down()
    elif args.cmd == "status":
        ok = env.is_running()
        print(f"{'running' if ok else 'not running'}: {env.url}")
        return 0 if ok else 1
    elif args.cmd == "base":
        env.write_config()
        print(env.build_base_image(force=args.force))
    elif args.cmd == "shell-env":
        print(
            f"export CONTAINERS_CONF={env.conf}\nexport CONTAINERS_STORAGE_CONF={env.storage_conf}\n"
            f"export DOCKER_HOST={env.url}"
        )
    elif args.cmd == "purge":
        env.purge()
    return 0


if __name__ == "__main__":
    sys.exit(main())
