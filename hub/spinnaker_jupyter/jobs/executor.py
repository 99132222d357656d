"""Where a job's command runs. `Executor` is what the runner needs; `LocalExecutor` (the embedded default) runs it
as the user's own system account, the same account their Jupyter server runs as (usernames.system_account_name),
in a scratch folder of its own, with CPU, memory, process and file-size limits (setrlimit) and in a process group
of its own so that everything it started can be stopped together; that session is recorded (sessions.py) so that
stopping the user's Jupyter server spares it.

A service running as root always switches to the user's account (a job never runs as root, even where the
servers run in containers or as root); one not running as root has no per-user accounts (as for user servers):
jobs run as the service's own account, and the log says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import resource
import signal
import subprocess
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from jupyterhub.spawner import set_user_setuid

from ..uid_range import UidRangeFull
from ..usernames import (
    AccountOfAnotherDeployment,
    make_system_account,
    own_system_account,
    system_account_name,
)
from . import sessions


class AccountError(RuntimeError):
    """The user's account cannot be used for their jobs; the message says why and what the operator does."""


@dataclass
class Account:
    name: str
    uid: int
    gid: int
    switched: bool  # False: the service's own account (not root, or system users off)


@dataclass
class RunLimits:
    cpu_seconds: int
    memory_bytes: int
    processes: int
    file_bytes: int


class Executor(ABC):
    @abstractmethod
    def account(self, user: str) -> Account:
        """The account a user's jobs run as (created when missing)."""

    @contextlib.asynccontextmanager
    async def slot(self, job_id: int, cwd: Path, limits: RunLimits, account: Account):
        """Where job `job_id`'s command will run, taken before its board is claimed: the block runs once start()
        can run the command at once (a Slurm job waits in the Slurm queue here, holding no board), and what was
        taken and not started is given back when the block ends, however it ends. Default: nothing to wait for."""
        yield

    @abstractmethod
    async def start(
        self, argv: list[str], cwd: Path, env: dict, limits: RunLimits, account: Account
    ) -> asyncio.subprocess.Process:
        """Start the job's command with stdout and stderr on one pipe, in a process group of its own (a job's
        command: inside its slot())."""

    @abstractmethod
    def kill(self, pgid: int, uid: int | None) -> None:
        """Stop a job's whole process group (also one left by a previous run of the service)."""

    def ended(self, pid: int) -> None:  # noqa: B027 - an optional hook: most executors have nothing to do
        """The command started with `pid` has ended: what is left of its session is stopped and no longer spared."""

    @abstractmethod
    def home(self, user: str) -> Path:
        """The user's home folder as their server sees it (it may not exist yet)."""

    @abstractmethod
    def as_account(self, account: Account):
        """A preexec function that makes a child process run as `account` (None: no switch)."""

    @abstractmethod
    def tar_files(self, root: Path, paths: list[str], account: Account) -> subprocess.Popen:
        """A tar stream of `paths` (relative to `root`), read with the job account's rights."""


class LocalExecutor(Executor):
    def __init__(
        self,
        homes_dir: Path,
        system_users: bool,
        prefix: str,
        log=None,
        sessions_dir: Path | None = None,
        uid_range: list[int] | None = None,
    ):
        self.homes_dir, self.system_users, self.prefix, self.log = homes_dir, system_users, prefix, log
        self.sessions_dir, self.uid_range = sessions_dir, uid_range

    def account(self, user: str) -> Account:
        if not self.system_users:
            pw = pwd.getpwuid(os.getuid())
            return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, switched=False)
        name = system_account_name(self.prefix, user)
        try:
            pw = pwd.getpwnam(name)
        except KeyError:  # the same account, made the same way, as the spawner makes for the user's server
            try:
                pw = make_system_account(name, self.homes_dir / user, user, self.uid_range)
            except UidRangeFull as e:
                raise AccountError(e.message("jobs")) from None
        try:  # by the rule the spawner applies to servers: another deployment's `jupyter-alice` is another person
            pw = own_system_account(pw, self.home(user), user, log=self.log)
        except AccountOfAnotherDeployment as e:
            raise AccountError(e.message("jobs")) from None
        return Account(name, pw.pw_uid, pw.pw_gid, switched=True)

    def _preexec(self, limits: RunLimits | None, account: Account, record: bool = False):
        setuid = set_user_setuid(account.name, chdir=False) if account.switched else None
        where = self.sessions_dir if record else None

        def preexec():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            if where is not None:  # before anything of the job runs: a server stop from now on spares it
                sessions.record_self(where, account.uid)
            if limits:
                resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
                resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
                resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                if account.switched:  # counts every process of the account, so only for an account of its own
                    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
            if setuid:
                setuid()

        return preexec

    def home(self, user):
        return self.homes_dir / user

    def as_account(self, account):
        return self._preexec(None, account) if account.switched else None

    async def start(self, argv, cwd, env, limits, account):
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self._preexec(limits, account, record=True),
        )

    def ended(self, pid: int) -> None:
        """The command started with `pid` has ended and its process group was stopped: its session is no longer
        spared."""
        for other in _pids_in_session(pid):  # also what moved to a process group of its own (killpg missed it)
            try:
                os.kill(other, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.sessions_dir is not None:
            sessions.forget(self.sessions_dir, pid)

    def kill(self, pgid: int, uid: int | None) -> None:
        if not pgid or pgid <= 1:
            return
        try:  # only a group still led by the job's account: never someone else's after a pid was reused
            if uid is not None and os.stat(f"/proc/{pgid}").st_uid != uid:
                return
        except FileNotFoundError:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def tar_files(self, root, paths, account):
        proc = subprocess.Popen(
            ["tar", "--create", "--file=-", "--directory", str(root), "--no-recursion", "--null", "--files-from=-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            preexec_fn=self._preexec(None, account),
            cwd="/",
        )
        names = b"".join(p.encode() + b"\0" for p in paths)

        def feed():  # in a thread: tar writes its output while it still reads names, and the pipes are small
            try:
                proc.stdin.write(names)
            except BrokenPipeError:
                pass
            finally:
                proc.stdin.close()

        threading.Thread(target=feed, daemon=True).start()
        return proc


def _pids_in_session(sid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return found
