"""Shared fixtures: the built environments, and a real hub (JupyterHub + configurable-http-proxy) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
ENVS = ROOT / "data" / "envs"
sys.path.insert(0, str(Path(__file__).parent))

import ports  # noqa: E402
import processes  # noqa: E402
from hubclient import HubClient, wait_for  # noqa: E402
from ports import free_port  # noqa: E402, F401  (tests and benchmarks import it from here)

pytest_plugins = [
    p for p in ("oidc_fixtures", "podman_fixtures", "slurm_fixtures") if (Path(__file__).parent / f"{p}.py").exists()
]

# --- every test ends what it starts ----------------------------------------------------------------------------
# The run's processes (tests/processes.py) are checked after each test module and at the end of the session: one
# still running fails the run, named with its command line and the module that left it (and is then ended).
WATCH = processes.Watch(os.getpid())


class _SessionFixtureWatch:
    """What a session-scoped fixture starts (the OIDC provider, podman's service) may live until the session ends.
    A plugin of its own, not a conftest hook: pytest sets session fixtures up through the Session node, which does not
    see the hooks of tests/conftest.py."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        before = set(WATCH.ours()) if fixturedef.scope == "session" else None
        yield
        if before is not None:
            for key in set(WATCH.ours()) - before:
                WATCH.exempt[key] = f"session fixture {fixturedef.argname} (set up in {request.node.nodeid})"


def pytest_configure(config):
    config.pluginmanager.register(_SessionFixtureWatch(), "spinnaker-session-fixture-watch")


@pytest.fixture(scope="module", autouse=True)
def _ends_what_it_starts(request, tmp_path_factory):
    basetemp = str(tmp_path_factory.getbasetemp())
    if basetemp not in WATCH.roots:
        WATCH.roots.append(basetemp)
    before = set(WATCH.ours())
    yield
    left = WATCH.leftovers(before)
    if left:
        processes.end(left)
        pytest.fail(
            f"{request.node.nodeid} left {len(left)} process(es) running after its tests and fixtures ended "
            "(now ended):\n  " + "\n  ".join(p.describe() for p in left),
            pytrace=False,
        )


# --- parallel runs (pytest-xdist, `make test`) -------------------------------------------------------------------
# Each worker is a pytest session of its own: its own session fixtures, process watch and hubs. What cannot be shared
# between two workers stays on one: a module's tests run together (its module fixtures start once), all container
# tests on one worker (one podman service, which removes the tests' leftover containers when it starts) and all
# Slurm tests on one (one test cluster). A worker's hubs give their system accounts a prefix of the worker's own,
# so two workers' users of one name never meet (RunningHub). Ports come from tests/ports.py, unique across workers.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... in a worker; "" otherwise
#: modules that start a Slurm cluster themselves (not through the `slurm` fixture)
STARTS_SLURM = {"test_ansible_slurm.py"}


def _xdist_group(item) -> str:
    names = set(item.fixturenames)
    if names & {"podman_engine"}:
        return "podman"
    if "slurm" in names or item.path.name in STARTS_SLURM:
        return "slurm"
    return item.path.name


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    by_module: dict = {}
    for item in items:
        by_module.setdefault(item.path, set()).add(_xdist_group(item))
    for item in items:
        groups = by_module[item.path]
        group = "podman" if "podman" in groups else "slurm" if "slurm" in groups else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_sessionfinish(session, exitstatus):
    """After every fixture has ended: nothing the run started may still run (podman's service only when
    SPINNAKER_PODMAN_KEEP asks to keep it). A worker hands what it found to the controller, which reports it."""
    procs = processes.table()
    kept = {
        p.pid
        for p in procs.values()
        if os.environ.get("SPINNAKER_PODMAN_KEEP")
        and p.cmdline.startswith("podman")
        and " system service " in p.cmdline
    }
    if _xdist_controller(session.config):
        # The workers (children of this process) are shut down only after this hook; what they started is theirs.
        kept |= {p.pid for p in procs.values() if p.ppid == os.getpid()}
    left = [
        p
        for p in WATCH.leftovers(WATCH.baseline, include_exempt=True, settle=5)
        if not processes.has_ancestor(p, kept, procs)
    ]
    lines = []
    if left:
        lines = [
            f"the test run{f' (worker {WORKER})' if hasattr(session.config, 'workerinput') else ''} left {len(left)} "
            "process(es) running (now ended):"
        ]
        lines += [f"  {p.describe()}  <- {WATCH.exempt.get(p.key, 'a test or fixture')}" for p in left]
        processes.end(left)
    ports.forget_run()
    if hasattr(session.config, "workeroutput"):  # (not the env: a pytest a test starts inherits it)
        session.config.workeroutput["leftovers"] = lines
    else:
        lines += _LEFT_BY_WORKERS
    if lines:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in lines:
            reporter.write_line(line, red=True) if reporter else print(line, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_LEFT_BY_WORKERS: list[str] = []


def _xdist_controller(config) -> bool:
    return config.pluginmanager.has_plugin("dsession")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist: a worker ended; keep what it left running for the controller's report."""
    _LEFT_BY_WORKERS.extend(getattr(node, "workeroutput", {}).get("leftovers", []))


def secret_file(tmp_path_factory, value: str, name: str = "spalloc-token") -> Path:
    """A secret the hub reads from a file (e.g. spinnaker.spalloc.token_file), 0600 in a folder of its own."""
    path = tmp_path_factory.mktemp("secrets") / name
    path.write_text(value + "\n")
    os.chmod(path, 0o600)
    return path


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
    (base / "c.yaml").write_text(
        yaml.safe_dump({"data_dir": str(base / "data"), "kernels": {"envs_dir": str(envs_dir)}})
    )
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


#: The system accounts of a worker's users (see "parallel runs"): jupyter-NAME in a run without xdist.
SYSTEM_USER_PREFIX = f"jupyter{WORKER.removeprefix('gw')}-" if WORKER else "jupyter-"


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
        if WORKER:
            cfg["spawner"] = {"local": {"system_user_prefix": SYSTEM_USER_PREFIX}}
        from spinnaker_jupyter.config import merge

        self.config = merge(cfg, overrides)
        self.config_file = base / "spinnaker-jupyter.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "hub.log"
        self.proc = None
        self.command = [BIN / "spinnaker-jupyter"]  # the operator's command (another release's: test_upgrade.py)

    def cli(self, *args, input=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.command, *args, "-c", self.config_file],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
            env=self.env,
        )

    def start(self, timeout: float = 60, wait: bool = True) -> RunningHub:
        """Start the hub and wait (unless not `wait`) until it is running: its API answers and JupyterHub has said
        "JupyterHub is now running", right before it installs its own SIGTERM handler (jupyterhub 6.1.1, app.py): a
        SIGTERM sooner, while its API already answers, ends its proxy and services without JupyterHub's clean-up
        (proxy.py)."""
        since = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [*self.command, "up", "--no-build", "-c", self.config_file],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
        )
        import requests

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                if requests.get(self.url + "/hub/api/", timeout=2).status_code != 200:
                    return False
            except (requests.ConnectionError, requests.Timeout):  # (not answering yet: a loaded machine)
                return False
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return b"JupyterHub is now running" in f.read()

        if wait:
            wait_for(up, timeout, "the hub to answer")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def add_user(self, name: str, admin: bool = False) -> str:
        r = self.cli("user", "add", name, *(["--admin"] if admin else []))
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split()[-1]

    def client(self, name: str, password: str) -> HubClient:
        holds = self.base / "holds"  # (hubclient.hold_starts)
        return HubClient(self.url, name, password, hold_dir=holds if holds.is_dir() else None)

    def system_account(self, name: str) -> str:
        """The system account the hub's local servers and jobs run as for user `name`."""
        from spinnaker_jupyter.usernames import system_account_name

        prefix = self.config.get("spawner", {}).get("local", {}).get("system_user_prefix", "jupyter-")
        return system_account_name(prefix, name)

    def own_processes(self) -> list[processes.Proc]:
        """This hub's processes: its descendants, and whatever runs in its folder (the proxy, services, user servers
        and kernels, including those an earlier run of the hub left, or a killed hub's proxy)."""
        procs = processes.table()
        running = self.proc is not None and self.proc.poll() is None
        tree = {p.pid for p in processes.descendants(self.proc.pid, procs)} if running else set()
        return [
            p
            for p in procs.values()
            if p.alive and p.pid != os.getpid() and (p.pid in tree or processes.under(p.cwd, [str(self.base)]))
        ]

    def stop(self, final: bool = False, timeout: float = 30):
        """Stop the hub as an operator does (SIGTERM, then wait), then end what it leaves behind. User servers (and
        what runs under them) live on when the hub keeps them through restarts (hub.stop_servers_on_exit: false),
        unless `final` (the fixture's end): then nothing of this hub is left running."""
        mine = self.own_processes()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                deadline = time.monotonic() + timeout
                # Wait without reaping, so that the hub's process group can still be named below.
                while os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the hub's own group (start_new_session)
            self.proc.wait()
        procs = processes.table()
        left = [p for p in {q.key: q for q in mine + self.own_processes()}.values() if processes.alive([p.key])]
        keep = not final and self.config["hub"].get("stop_servers_on_exit") is False
        if keep:
            left = [p for p in left if not processes.in_user_server(p, procs)]
        processes.end(left)


def traversable_tmpdir(prefix: str) -> Path:
    """pytest's tmp folders are private to root; user servers running as their own accounts must reach theirs."""
    parent = ROOT / ".cache" / "tests"
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o755)
    WATCH.roots.append(str(path))  # what runs in it is this run's (tests/processes.py)
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
        hub.stop(final=True)
        keep = ROOT / "tests" / "artifacts" / hub.base.name  # logs outlive the run, for failures
        keep.mkdir(parents=True, exist_ok=True)
        for log in [hub.log_path, *(hub.base / "data" / "logs").glob("*.log")]:
            if log.exists():  # a hub made with start=False may never have run
                shutil.copy(log, keep / log.name)
        shutil.rmtree(hub.base, ignore_errors=True)
