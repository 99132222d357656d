"""The processes a test run starts, read from /proc: so that every test ends what it starts, and the run fails,
naming the process, when a test module leaves one behind (see conftest.py).

A process belongs to this run when pytest is among its ancestors, or when its working folder is one of the run's
own folders (a hub's folder: its proxy, services, user servers and kernels, which JupyterHub starts in sessions of
their own and which are re-parented to init once the hub is gone). Processes are named by (pid, start time), so a
reused pid is never mistaken for the process that had it before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

SINGLEUSER = "jupyterhub-singleuser"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str
    start: int  # clock ticks after boot (field 22 of /proc/PID/stat)
    uid: int
    cmdline: str
    cwd: str

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")  # a zombie has ended; only its parent's wait is missing

    def describe(self) -> str:
        return f"pid {self.pid} (uid {self.uid}): {self.cmdline[:400] or '?'}  [cwd {self.cwd or '?'}]"


def read(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    return Proc(pid, int(fields[1]), int(fields[2]), fields[0], int(fields[19]), uid, cmdline, cwd)


def table() -> dict[int, Proc]:
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read(int(name))
            if p is not None:
                procs[p.pid] = p
    return procs


def has_ancestor(p: Proc, pids: set[int], procs: dict[int, Proc]) -> bool:
    seen = set()
    while p is not None and p.pid not in seen:
        if p.pid in pids:
            return True
        seen.add(p.pid)
        p = procs.get(p.ppid)
    return False


def descendants(pid: int, procs: dict[int, Proc]) -> list[Proc]:
    return [p for p in procs.values() if p.pid != pid and has_ancestor(p, {pid}, procs)]


def under(path: str, roots: Iterable[str]) -> bool:
    path = path.removesuffix(" (deleted)")  # the folder was removed while the process ran in it
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def in_user_server(p: Proc, procs: dict[int, Proc]) -> bool:
    """A user's server, or anything running under one (kernels, terminals, what a notebook started)."""
    return has_ancestor(p, {q.pid for q in procs.values() if SINGLEUSER in q.cmdline}, procs)


def alive(keys: Iterable[tuple[int, int]]) -> list[Proc]:
    out = []
    for pid, start in keys:
        p = read(pid)
        if p is not None and p.start == start and p.alive:
            out.append(p)
    return out


def end(procs: Iterable[Proc], grace: float = 10.0) -> list[Proc]:
    """SIGTERM each, SIGKILL what is left after `grace` seconds; wait until all are gone. Returns the ones that
    needed SIGKILL."""
    keys = [p.key for p in procs]
    for p in alive(keys):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(keys) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = alive(keys)
    for p in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(keys) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


class Watch:
    """The run's processes: pytest's descendants and whatever runs in the run's folders (`roots`). Processes that
    session-scoped fixtures start (`exempt`) may live until the session ends, and so may their descendants."""

    def __init__(self, pid: int):
        self.pid = pid
        self.roots: list[str] = []
        self.exempt: dict[tuple[int, int], str] = {}
        self.baseline = set(self.ours())

    def ours(self, procs: dict[int, Proc] | None = None) -> dict[tuple[int, int], Proc]:
        procs = table() if procs is None else procs
        return {
            p.key: p
            for p in procs.values()
            if p.alive and p.pid != self.pid and (has_ancestor(p, {self.pid}, procs) or under(p.cwd, self.roots))
        }

    def exempt_pids(self, procs: dict[int, Proc]) -> set[int]:
        return {p.pid for p in procs.values() if p.key in self.exempt}

    def leftovers(self, before: set, include_exempt: bool = False, settle: float = 10.0) -> list[Proc]:
        """Processes of the run not in `before` that are still alive after up to `settle` seconds (a process that
        was just told to stop gets that long to go)."""
        deadline = time.monotonic() + settle
        while True:
            procs = table()
            exempt = set() if include_exempt else self.exempt_pids(procs)
            left = [p for k, p in self.ours(procs).items() if k not in before and not has_ancestor(p, exempt, procs)]
            if not left or time.monotonic() > deadline:
                return sorted(left, key=lambda p: p.pid)
            time.sleep(0.1)
