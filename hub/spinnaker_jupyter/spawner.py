"""The embedded default's spawner: one local process per user, with a private home under the data folder.

As root, each hub user's server runs as a system account of their own (`jupyter-<name>`), created on first start,
home mode 0700. Otherwise every server runs as the hub's own account (said plainly at start-up).
Start-up is reported in words on the spawn-pending page, and the spawner itself waits for the server to listen
(polling every 50 ms) so the hub's own readiness check succeeds at its first try instead of backing off for seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pwd
import re
import signal
import subprocess
import time
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner, SpawnException, set_user_setuid
from traitlets import Bool, Integer, List, Unicode, default

from . import limits as limitsmod
from .boards import BoardsMixin
from .fork_server import ForkServer, ForkServerError, Request, popen_arguments
from .jobs import sessions as job_sessions
from .progress import ProgressMixin, wait_until_listening
from .spawn_queue import refuse_if_full, start_slot
from .uid_range import DEFAULT_UID_RANGE, UidRangeFull
from .usernames import (
    AccountOfAnotherDeployment,
    make_system_account,
    own_system_account,
    system_account_name,
)


class PrivateHomeSpawner(ProgressMixin, LocalProcessSpawner):
    homes_dir = Unicode(help="Folder holding each user's home (one sub-folder per hub user).").tag(config=True)
    logs_dir = Unicode(help="Folder for each server's log (read by the hub when a start fails).").tag(config=True)
    system_users = Bool(help="Run each server as the user's own system account (requires root).").tag(config=True)
    system_user_prefix = Unicode("jupyter-", help="Prefix of the system account names.").tag(config=True)
    uid_range = List(
        Integer(), list(DEFAULT_UID_RANGE), minlen=2, maxlen=2, help="First and last uid of new system accounts."
    ).tag(config=True)
    fast_ready_check = Bool(
        True,
        help="Return from start() only once the server listens (polled every 50 ms), so "
        "the hub's own readiness check, which backs off exponentially up to 5 s, "
        "succeeds at its first try. False: stock behaviour (for benchmarks).",
    ).tag(config=True)
    process_limit = Integer(None, allow_none=True, help="Processes and threads per server (None: no limit).").tag(
        config=True
    )
    limits_mode = Unicode(
        "auto",
        help="How mem_limit, cpu_limit and process_limit are enforced: `auto` (a cgroup "
        "per server where possible, else rlimits), `cgroup` or `rlimits`.",
    ).tag(config=True)
    job_sessions_dir = Unicode(
        "",
        help="Folder where the job service records the process sessions of running batch "
        "jobs (jobs/sessions.py): a server's stop spares them. '' = no job service.",
    ).tag(config=True)
    fork_server = Bool(
        False,
        help="Fork each server from the hub's fork server, which imported the server's modules once "
        "(fork_server.py), instead of starting a new interpreter; any failure falls back to Popen.",
    ).tag(config=True)
    fork_server_dir = Unicode("", help="Folder of the fork server's socket (the hub's account's, 0700).").tag(
        config=True
    )
    _cgroup_dirs: list = []

    @default("system_users")
    def _system_users_default(self):
        return os.geteuid() == 0

    @property
    def system_username(self) -> str:
        return system_account_name(self.system_user_prefix, self.user.name)

    @property
    def home(self) -> Path:
        return Path(self.homes_dir) / self.user.name

    @default("notebook_dir")
    def _notebook_dir_default(self):
        return str(self.home)

    def _ensure_account(self) -> None:
        """Create the system account and the private home (idempotent)."""
        home = self.home
        home.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(home.parent, 0o711)  # users may reach their own home, not list the others
        if self.system_users:
            try:
                pwd.getpwnam(self.system_username)
            except KeyError:
                try:
                    make_system_account(self.system_username, home, self.user.name, self.uid_range)
                except UidRangeFull as e:
                    full = SpawnException(e.message("server"), reason="uid_range_full", status_code=503)
                    full.jupyterhub_message = e.message("server")  # what the spawn page says
                    raise full from None
                self.log.info("Created system account %s for %s", self.system_username, self.user.name)
            pw = self._own_account(pwd.getpwnam(self.system_username))
            home.mkdir(mode=0o700, exist_ok=True)
            st = home.stat()
            if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid):
                os.chown(home, pw.pw_uid, pw.pw_gid)
            os.chmod(home, 0o700)
        else:
            home.mkdir(mode=0o700, exist_ok=True)

    def _own_account(self, pw: pwd.struct_passwd) -> pwd.struct_passwd:
        """The existing system account, if it is this deployment's (usernames.own_system_account); another
        deployment's is refused with a message the spawn page shows."""
        try:
            return own_system_account(pw, self.home, self.user.name, self.log)
        except AccountOfAnotherDeployment as e:
            refused = SpawnException(e.message("server"), reason="account_of_another_deployment", status_code=409)
            refused.jupyterhub_message = e.message("server")  # what the spawn page says
            raise refused from None

    @property
    def limits(self) -> limitsmod.Limits:
        return limitsmod.Limits(mem=self.mem_limit or None, cpu=self.cpu_limit or None, tasks=self.process_limit)

    def _cgroup_name(self) -> str:
        name = self.user.name + (f".{self.name}" if self.name else "")
        return re.sub(r"[^A-Za-z0-9_.-]", "_", name)

    def _make_cgroup(self) -> list:
        tree, _ = _cgroup_tree(self.limits_mode, self.homes_dir)
        return tree.create(self._cgroup_name(), self.limits) if tree else []

    def make_preexec_fn(self, name):
        home = str(self.home)
        setuid = set_user_setuid(self.system_username, chdir=False) if self.system_users else None
        limit = limitsmod.preexec(self._cgroup_dirs, self.limits, own_account=self.system_users)

        def preexec():
            # A hub started in the background inherits an ignored SIGINT; the hub stops servers with SIGINT.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            limit()  # the server's own cgroup (or rlimits), while still root
            if setuid:
                setuid()
            os.chdir(home)

        return preexec

    def user_env(self, env):
        env["USER"] = self.system_username if self.system_users else pwd.getpwuid(os.getuid()).pw_name
        env["HOME"] = str(self.home)
        env["SHELL"] = "/bin/bash"
        return env

    def _log_path(self) -> Path:
        return Path(self.logs_dir) / f"{self.user.name}{'-' + self.name if self.name else ''}.log"

    def run_pre_spawn_hook(self):
        refuse_if_full(self)  # a full start queue refuses at once, before a SpiNNaker board is claimed
        return super().run_pre_spawn_hook()

    async def start(self):
        self.progress_reset()
        async with start_slot(self):  # a few starts at a time, first come first served (spawn_queue.py)
            return await self._start()

    async def _start(self):
        t0 = time.monotonic()
        if self.system_users:
            self.progress_say(10, f"Preparing your private home folder and account {self.system_username}")
        else:
            self.progress_say(10, "Preparing your home folder")
        await asyncio.get_running_loop().run_in_executor(None, self._ensure_account)
        self._cgroup_dirs = await asyncio.get_running_loop().run_in_executor(None, self._make_cgroup)
        log_path = self._log_path()
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log = open(log_path, "ab", buffering=0)
        os.chmod(log_path, 0o600)
        log.write(f"\n--- start {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        self.popen_kwargs = {**self.popen_kwargs, "stdout": log, "stderr": subprocess.STDOUT}
        self.progress_say(30, "Starting your Jupyter server (JupyterLab, terminals and the sPyNNaker kernel)")
        try:
            ip, port = await self._start_process(log_path)
        finally:
            log.close()
        self.progress_say(60, "Waiting for your Jupyter server to answer")
        if self.fast_ready_check:
            await self._wait_listening(ip, port, log_path)
        self.progress_say(90, f"Your server is up after {time.monotonic() - t0:.1f} s; opening it")
        return ip, port

    async def _start_process(self, log_path: Path) -> tuple[str, int]:
        """Forked from the fork server when it is on (it falls back to Popen, saying why, whatever goes wrong)."""
        if self.fork_server and self.fork_server_dir:
            try:
                return await self._fork(log_path)
            except (ForkServerError, OSError) as e:
                self.log.warning("[%s] Fork server not used, starting with Popen: %s", self.user.name, e)
        return await super().start()

    def shared_env(self) -> dict[str, str]:
        """The environment every server shares (the fork server's own): the hub's variables of `env_keep`."""
        return {k: os.environ[k] for k in self.env_keep if k in os.environ}

    async def _fork(self, log_path: Path) -> tuple[str, int]:
        zygote = ForkServer.of(self.fork_server_dir)
        zygote.launch(self.shared_env())
        cmd, env = popen_arguments(self)
        ids = {}
        if self.system_users:  # (as set_user_setuid: the account's group and its supplementary groups)
            pw = pwd.getpwnam(self.system_username)
            ids = {"uid": pw.pw_uid, "gid": pw.pw_gid, "groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}
        lim = self.limits
        dirs = [str(d) for d in self._cgroup_dirs]
        req = Request(
            cmd, env, str(self.home), str(log_path), dirs, lim.mem, lim.cpu, lim.tasks, self.system_users, **ids
        )
        self.pid = await zygote.start(req, timeout=30)
        self.proc = None  # LocalProcessSpawner polls and stops by pid, as after a hub restart
        self.log.info("[%s] Started through the fork server: pid %d", self.user.name, self.pid)
        return (self.ip or "127.0.0.1", self.port)

    async def poll(self):
        if self.proc is None and self.pid and _ended(self.pid):  # a zombie nobody reaped (its parent gone) has ended
            self.clear_state()
            return 0
        return await super().poll()

    async def stop(self, now=False):
        await super().stop(now=now)
        # Kernels' children (a web server on port 9000, a simulation) must not outlive the session; the user's
        # batch jobs, which run as the same account but do not belong to the server, must.
        loop = asyncio.get_running_loop()
        tree, _ = _cgroup_tree(self.limits_mode, self.homes_dir)
        if tree:  # everything the server started is in its cgroup, and nothing else is
            await loop.run_in_executor(None, tree.remove, self._cgroup_name())
            return
        others = [s for s in self.user.spawners.values() if s is not self and s.active]
        uid = self._account_uid()
        if self.system_users and not others and uid is not None:
            jobs = functools.partial(job_sessions.recorded, self.job_sessions_dir)
            left = await loop.run_in_executor(None, kill_processes_of, uid, 5.0, jobs)
            if left:
                self.log.info("Stopped %d leftover process(es) of %s", left, self.system_username)

    def _account_uid(self) -> int | None:
        """None when the account was never made (a start refused before it, e.g. by a full start queue)."""
        try:
            return pwd.getpwnam(self.system_username).pw_uid
        except KeyError:
            return None

    async def _wait_listening(self, ip: str, port: int, log_path: Path) -> None:
        async def ended():
            if self.proc is not None and self.proc.poll() is not None:
                return (
                    f"Your server stopped during start-up (exit code {self.proc.returncode}). Last lines of "
                    f"its log:\n{_tail(log_path)}"
                )
            if self.proc is None and self.pid and _ended(self.pid):  # (forked: not the hub's child)
                return f"Your server stopped during start-up. Last lines of its log:\n{_tail(log_path)}"
            return None

        try:
            await wait_until_listening(ip, port, self.start_timeout, ended)
        except TimeoutError as e:
            raise TimeoutError(f"{e} Last lines of its log:\n{_tail(log_path)}") from None


def launch_fork_server_with_the_hub(config) -> None:
    """Start the fork server as the hub starts (from jupyterhub_config.py, once the operator's files have been read),
    not at the first server start: that start, a class's first student after a hub (re)start, would otherwise wait
    for its imports (~1 CPU-s; in the 30-user burst every user was ~1.3 s later). Only in the hub itself (not a
    `jupyterhub` sub-command that reads the config) and only when the configured spawner forks its servers."""
    from jupyterhub.app import JupyterHub
    from traitlets.utils.importstring import import_item

    if not JupyterHub.initialized() or JupyterHub.instance().subapp is not None:
        return
    cls = config.JupyterHub.get("spawner_class")
    cls = import_item(cls) if isinstance(cls, str) and "." in cls else cls
    if not (isinstance(cls, type) and issubclass(cls, PrivateHomeSpawner)):
        return
    spawner = cls(config=config)  # (the traits as every user's spawner resolves them; no user, nothing started)
    if spawner.fork_server and spawner.fork_server_dir:
        ForkServer.of(spawner.fork_server_dir).launch(spawner.shared_env())


@functools.cache
def _cgroup_tree(mode: str, homes_dir: str):
    """Decided once per hub: the deployment's cgroup tree (None: rlimits), and why."""
    return limitsmod.choose(mode, homes_dir)


class SpiNNakerLocalSpawner(BoardsMixin, PrivateHomeSpawner):
    """The local spawner with SpiNNaker boards: the claim (boards/mixin.py) comes before any other start-up step."""


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                pass
    return pids


def kill_processes_of(uid: int, grace: float = 5.0, spared=None) -> int:
    """SIGTERM every process of `uid`, then SIGKILL what is left after `grace` seconds. Returns how many.
    `spared()`: {session id: uid} of running batch jobs (jobs/sessions.py), asked again at each pass so that a job
    that starts meanwhile is spared too; their processes are left alone."""
    if uid == 0:
        raise ValueError("refusing to kill root's processes")

    def targets():
        jobs = spared() if spared else {}
        return [p for p in _pids_of(uid) if not (jobs and job_sessions.spared_pid(p, uid, jobs))]

    pids = targets()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while targets() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in targets():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
