"""Shared fixtures: the built environments, and a real hub (JupyterHub + configurable-http-proxy) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
ENVS = ROOT / "data" / "envs"
sys.path.insert(0, str(Path(__file__).parent))

from hubclient import HubClient, wait_for  # noqa: E402

pytest_plugins = [p for p in ("oidc_fixtures", "podman_fixtures") if (Path(__file__).parent / f"{p}.py").exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def envs_dir() -> Path:
    """The kernel environments `make test` builds once (`spinnaker-jupyter build -c tests/build-config.yaml`)."""
    if not (ENVS / "spynnaker" / "bin" / "python").exists():
        subprocess.run([BIN / "spinnaker-jupyter", "build", "-c", ROOT / "tests" / "build-config.yaml"], check=True)
    return ENVS


@pytest.fixture(scope="session")
def spynnaker_python(envs_dir) -> Path:
    return envs_dir / "spynnaker" / "bin" / "python"


@pytest.fixture(scope="session")
def chp_command() -> str:
    return str(ROOT / "node_modules" / ".bin" / "configurable-http-proxy")


@pytest.fixture(scope="session")
def spynnaker_kernel(envs_dir, tmp_path_factory):
    """The `spynnaker` kernelspec with the deployment's virtual-board cfg, visible to jupyter_client in this process."""
    from spinnaker_jupyter import config, kernels

    base = tmp_path_factory.mktemp("kernel")
    (base / "c.yaml").write_text(yaml.safe_dump({"data_dir": str(base / "data"), "kernels": {"envs_dir": str(envs_dir)}}))
    d = config.load([base / "c.yaml"])
    kernels.write_kernelspec(d, envs_dir / "spynnaker")
    kernels.write_spynnaker_cfg(d)
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "SPINNAKER_CFG_DIR")}
    os.environ["JUPYTER_PATH"] = str(d.share_dir)
    os.environ["SPINNAKER_CFG_DIR"] = str(d.spynnaker_cfg_dir)
    yield SimpleNamespace(jupyter_path=d.share_dir, cfg_dir=d.spynnaker_cfg_dir, workdir=base)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class RunningHub:
    """`spinnaker-jupyter up` in a subprocess with a config of the test's own."""

    def __init__(self, base: Path, overrides: dict, envs_dir: Path, env: dict | None = None):
        self.base = base
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        cfg = {
            "data_dir": str(base / "data"),
            "hub": {"port": self.port, "stop_servers_on_exit": True},
            "proxy": {"api_port": free_port(), "hub_port": free_port()},
            "kernels": {"envs_dir": str(envs_dir)},
            "git_kernel": {"enabled": False},  # GitHub is not reachable here; tests that want it set it up
        }
        from spinnaker_jupyter.config import merge

        self.config = merge(cfg, overrides)
        self.config_file = base / "spinnaker-jupyter.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "hub.log"
        self.proc = None

    def cli(self, *args, input=None) -> subprocess.CompletedProcess:
        return subprocess.run([BIN / "spinnaker-jupyter", *args, "-c", self.config_file], capture_output=True,
                              text=True, input=input, timeout=120, env=self.env)

    def start(self, timeout: float = 60) -> "RunningHub":
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([BIN / "spinnaker-jupyter", "up", "--no-build", "-c", self.config_file],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        import requests

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                return requests.get(self.url + "/hub/api/", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, timeout, "the hub to answer")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def add_user(self, name: str, admin: bool = False) -> str:
        r = self.cli("user", "add", name, *(["--admin"] if admin else []))
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split()[-1]

    def client(self, name: str, password: str) -> HubClient:
        return HubClient(self.url, name, password)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def traversable_tmpdir(prefix: str) -> Path:
    """pytest's tmp folders are private to root; user servers running as their own accounts must reach theirs."""
    parent = ROOT / ".cache" / "tests"
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def hub_factory(envs_dir, chp_command):
    hubs = []

    def make(overrides: dict | None = None, start: bool = True, env: dict | None = None) -> RunningHub:
        hub = RunningHub(traversable_tmpdir("hub-"), overrides or {}, envs_dir, env)
        hubs.append(hub)
        return hub.start() if start else hub

    yield make
    for hub in hubs:
        hub.stop()
        keep = ROOT / "tests" / "artifacts" / hub.base.name  # logs outlive the run, for failures
        keep.mkdir(parents=True, exist_ok=True)
        for log in [hub.log_path, *(hub.base / "data" / "logs").glob("*.log")]:
            shutil.copy(log, keep / log.name)
        shutil.rmtree(hub.base, ignore_errors=True)
