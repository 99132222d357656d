"""A real Slurm on this machine for the tests: munged, slurmctld and slurmd from Debian's packages (slurm-wlm, munge;
`scripts/system-deps.sh --test` installs them), with a private munge key and a slurm.conf (hub/spinnaker_jupyter/
slurm_conf.py: one node, this host; licences for 2 SpiNNaker boards; non-default ports) under one folder of its own.

    def test_x(slurm):
        slurm.conf           # path of slurm.conf (every client command needs SLURM_CONF=that)
        slurm.env            # os.environ plus SLURM_CONF
        slurm.run("squeue", "-h")   # a client command, as root
        slurm.partition      # the one partition

Where the packages are missing or the tests do not run as root, the tests using it are skipped with the reason.
Every daemon started here is ended when the session ends (jobs first, with scancel).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ports import free_port
from spinnaker_jupyter import slurm_conf

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")


@dataclass
class Slurm:
    folder: Path
    conf: Path
    partition: str
    boards: int
    procs: dict = field(default_factory=dict)

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        # (in its own folder: a job submitted here writes its slurm-<id>.out there, not into the checkout)
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.folder
        )

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}); its log:\n{self.log(name)[-3000:]}")
            state = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise TimeoutError(f"the Slurm node is not idle after {timeout:.0f} s (sinfo: {state!r})")

    def log(self, name: str) -> str:
        path = self.folder / ("munge/munged.log" if name == "munged" else f"{name}.log")
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    def free_memory_mb(self) -> int:
        """Memory no job holds (what a job may still ask for)."""
        out = self.run("scontrol", "show", "node", "-o").stdout
        real, alloc = (int(re.search(rf"\b{k}=(\d+)", out).group(1)) for k in ("RealMemory", "AllocMem"))
        return real - alloc

    def jobs(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i %T %u %r").stdout
        return [line for line in out.splitlines() if line.strip()]

    def cancel_all(self, timeout: float = 30) -> None:
        self.run("scancel", "--full", "--partition", self.partition)
        deadline = time.monotonic() + timeout
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.2)

    def start_daemon(self, name: str, cmd: list[str]) -> None:
        self.procs[name] = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=self.folder,
            stdin=subprocess.DEVNULL,
            stdout=open(self.folder / f"{name}.out", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_daemon(self, name: str, timeout: float = 15) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def start_controller(self) -> None:
        self.start_daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])

    def shutdown(self) -> None:
        """Jobs first (scancel), then the daemons; the folder goes."""
        if "slurmctld" in self.procs:
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            self.stop_daemon(name)
        _wait_steps_gone(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "a real Slurm for the tests needs root (its daemons, and jobs as the users' own accounts)"
    absent = [t for t in (*DAEMONS, "sbatch", "squeue", "scontrol", "sinfo") if not shutil.which(t)]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing): run scripts/system-deps.sh --test"
    return None


def start_slurm(boards: int = 2, memory_mb: int = 8000, jobs_per_core: int = 8) -> Slurm:
    """munged, slurmctld and slurmd in a folder of their own, up and idle (benchmarks use it too); `shutdown()`
    ends them."""
    parent = ROOT / ".cache" / "tests"
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="slurm-", dir=parent))
    os.chmod(folder, 0o755)  # every user's sbatch reads slurm.conf and reaches the munge socket
    munge_dir = folder / "munge"
    munge_dir.mkdir(mode=0o755)
    munge = pwd.getpwnam("munge")
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    key = munge_dir / "munge.key"
    slurm_conf.write_munge_key(key)
    socket_path = munge_dir / "munge.socket"
    for sub in ("state", "spool"):
        (folder / sub).mkdir(mode=0o700)
    conf = folder / "slurm.conf"
    conf.write_text(
        slurm_conf.render(
            folder,
            boards=boards,
            ctld_port=free_port(),
            slurmd_port=free_port(),
            memory_mb=memory_mb,
            munge_socket=socket_path,
            share_cores=True,
            jobs_per_core=jobs_per_core,
        )
    )
    os.chmod(conf, 0o644)
    s = Slurm(folder, conf, "spinnaker", boards)
    try:
        s.start_daemon(
            "munged",
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "munged",
                "--foreground",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'seed'}",
            ],
        )
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if s.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{s.log('munged')[-2000:]}")
            time.sleep(0.05)
        s.start_controller()
        s.start_daemon("slurmd", ["slurmd", "-D", "-f", str(conf)])
        s.wait_idle()
    except BaseException:
        s.shutdown()
        raise
    return s


@pytest.fixture(scope="session")
def slurm():
    why = _missing()
    if why:
        pytest.skip(why)
    s = start_slurm()
    try:
        yield s
    finally:
        s.shutdown()


def _wait_steps_gone(folder: Path, timeout: float = 15) -> None:
    """slurmstepd (one per job step, detached from slurmd) ends on its own once its job has; wait for that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in os.listdir("/proc") if p.isdigit() and _is_step(p, folder)]
        if not left:
            return
        time.sleep(0.1)


def _is_step(pid: str, folder: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(b"slurmstepd")
    except OSError:
        return False
