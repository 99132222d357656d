"""Resource limits of each local user server (spawner.mem_limit, cpu_limit, process_limit).

A cgroup per server where the machine lets the hub make one (cgroup v2, or the v1 controllers pids/memory/cpu when
those are what the kernel offers), so a fork bomb stops at `process_limit` tasks, a memory hog is killed at
`mem_limit` for the whole server, and `cpu_limit` caps its cores; the hub's own processes stay outside. Where no
cgroup can be made (no root, a read-only /sys/fs/cgroup), rlimits instead: RLIMIT_NPROC (per account, so it needs
one system account per user), RLIMIT_DATA (per process) and a lower CPU priority; cpu_limit is then not enforced.
`describe()` says which is in force (spinnaker-jupyter check, and the hub's log at start-up).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .hubconfig import system_users_enabled

CPU_PERIOD = 100_000  # microseconds
RLIMIT_NICE = 10  # without a cgroup, user servers yield the CPU to the hub


@dataclass
class Limits:
    mem: int | None = None  # bytes
    cpu: float | None = None  # cores
    tasks: int | None = None  # processes and threads

    def words(self) -> str:
        return ", ".join(
            [
                f"{self.tasks} processes" if self.tasks else "processes unlimited",
                f"{self.mem / 2**20:.0f} MiB memory" if self.mem else "memory unlimited",
                f"{self.cpu:g} CPU" if self.cpu else "CPU unlimited",
            ]
        )


def parse_bytes(value: str | int | None) -> int | None:
    if value in (None, ""):
        return None
    m = re.fullmatch(r"([0-9]+)([KMGT]?)", str(value))
    if not m:
        raise ValueError(f"not a size: {value!r}")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of every cgroup file system."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fstype, _source, options = (right.split() + ["", ""])[:3]
            if fstype in ("cgroup", "cgroup2"):
                found.append((left.split()[4].replace("\\040", " "), fstype, set(options.split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup per controller ('' = the v2 hierarchy)."""
    paths = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


class CgroupTree:
    """This deployment's folder of server cgroups, in one v2 hierarchy or in each v1 controller's hierarchy."""

    def __init__(self, kind: str, bases: dict[str, Path]):
        self.kind, self.bases = kind, bases  # v2: {"": dir}; v1: {"pids": dir, "memory": dir, "cpu": dir}

    def __repr__(self):
        return f"CgroupTree({self.kind}, {self.bases})"

    def dirs(self, name: str) -> list[Path]:
        return [base / name for base in self.bases.values()]

    def create(self, name: str, limits: Limits) -> list[Path]:
        """The server's cgroup(s), made (or reset) with `limits`; returns the folders a process joins."""
        for base in self.bases.values():  # made again after the last server of the deployment removed it
            base.mkdir(exist_ok=True)
        if self.kind == "cgroup2":
            _write(self.bases[""] / "cgroup.subtree_control", _wanted(self.bases[""]))
        for d in self.dirs(name):
            d.mkdir(exist_ok=True)
        if self.kind == "cgroup2":
            d = self.bases[""] / name
            _write(d / "pids.max", limits.tasks or "max")
            _write(d / "memory.max", limits.mem or "max")
            _write(d / "memory.swap.max", 0 if limits.mem else "max", optional=True)
            _write(
                d / "cpu.max",
                f"{int(limits.cpu * CPU_PERIOD)} {CPU_PERIOD}" if limits.cpu else "max",
                optional="cpu" not in _controllers(self.bases[""]),
            )
        else:
            _write(self.bases["pids"] / name / "pids.max", limits.tasks or "max")
            mem = self.bases["memory"] / name
            if limits.mem:
                # memsw (memory + swap) must stay >= the memory limit: raise it first when it exists
                _write(mem / "memory.memsw.limit_in_bytes", -1, optional=True)
                _write(mem / "memory.limit_in_bytes", limits.mem)
                _write(mem / "memory.memsw.limit_in_bytes", limits.mem, optional=True)
            else:
                _write(mem / "memory.memsw.limit_in_bytes", -1, optional=True)
                _write(mem / "memory.limit_in_bytes", -1)
            if "cpu" in self.bases:
                _write(self.bases["cpu"] / name / "cpu.cfs_period_us", CPU_PERIOD)
                _write(
                    self.bases["cpu"] / name / "cpu.cfs_quota_us", int(limits.cpu * CPU_PERIOD) if limits.cpu else -1
                )
        return self.dirs(name)

    def pids(self, name: str) -> set[int]:
        found = set()
        for d in self.dirs(name):
            with contextlib.suppress(OSError):
                found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
        return found

    def prune(self) -> int:
        """Remove the cgroups of servers that no longer run (left by a hub that was killed, or whose servers ended
        while it was down). Only at hub start-up, before any spawn: a server's cgroup is empty until it joins."""
        pruned = 0
        for base in self.bases.values():
            with contextlib.suppress(OSError):
                for child in base.iterdir():
                    if child.is_dir() and not (child / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):
                            child.rmdir()
                            pruned += 1
            with contextlib.suppress(OSError):
                base.rmdir()
        return pruned

    def remove(self, name: str, timeout: float = 10) -> None:
        """Kill whatever still runs in the server's cgroup, then remove it."""
        deadline = time.monotonic() + timeout
        while (pids := self.pids(name)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for d in self.dirs(name):
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()
        for base in self.bases.values():  # nothing of ours stays behind once no server runs
            with contextlib.suppress(OSError):
                base.rmdir()


def _controllers(d: Path) -> set[str]:
    try:
        return set((d / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _wanted(d: Path) -> str:
    return " ".join(f"+{c}" for c in ("pids", "memory", "cpu") if c in _controllers(d))


def _write(path: Path, value, optional: bool = False) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError:
        if not optional:
            raise


def _v2_tree(name: str) -> tuple[CgroupTree | None, str]:
    mounts = [m for m in _mounts() if m[1] == "cgroup2"]
    own = _own_paths().get("")
    if not mounts or own is None:
        return None, "no cgroup v2 hierarchy"
    mount = Path(mounts[0][0])
    here = mount / own.lstrip("/")
    missing = {"pids", "memory"} - _controllers(here)
    if missing:
        return None, f"cgroup v2 at {mount} offers no {'/'.join(sorted(missing))} controller"
    wanted = _wanted(here)
    try:
        with contextlib.suppress(OSError):
            (here / "cgroup.subtree_control").write_text(wanted)
        if not {"pids", "memory"} <= set((here / "cgroup.subtree_control").read_text().split()):
            # Controllers reach sub-groups only of a group without processes of its own: the hub (and what it
            # started) moves into a leaf beside the servers' tree, as under systemd's Delegate=yes.
            leaf = here / "hub"
            leaf.mkdir(exist_ok=True)
            for pid in (here / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (leaf / "cgroup.procs").write_text(pid)
            (here / "cgroup.subtree_control").write_text(wanted)
        tree = here / name
        tree.mkdir(exist_ok=True)
        (tree / "cgroup.subtree_control").write_text(wanted)
        with contextlib.suppress(OSError):  # a probe: servers' start-up makes it again (if not in use now)
            tree.rmdir()
    except OSError as e:
        return None, f"cgroup v2 at {here} is not delegated to the hub ({e.strerror})"
    return CgroupTree("cgroup2", {"": tree}), f"a cgroup v2 per server under {tree}"


def _v1_tree(name: str) -> tuple[CgroupTree | None, str]:
    own = _own_paths()
    bases = {}
    for controller in ("pids", "memory", "cpu"):
        mount = next((m[0] for m in _mounts() if m[1] == "cgroup" and controller in m[2]), None)
        if mount is None or controller not in own:
            continue
        tree = Path(mount) / own[controller].lstrip("/") / name
        try:
            tree.mkdir(exist_ok=True)
        except OSError:
            continue
        with contextlib.suppress(OSError):  # a probe: servers' start-up makes it again (if not in use now)
            tree.rmdir()
        bases[controller] = tree
    if not {"pids", "memory"} <= set(bases):
        return None, "no writable cgroup v1 pids and memory controllers"
    return CgroupTree("cgroup1", bases), (
        f"a cgroup per server (v1 controllers {', '.join(sorted(bases))}) under {bases['pids'].parent.parent}/…/{name}"
    )


def deployment_tree_name(homes_dir: str) -> str:
    return "spinnaker-jupyter-" + hashlib.sha256(os.path.realpath(homes_dir).encode()).hexdigest()[:8]


def choose(mode: str, homes_dir: str) -> tuple[CgroupTree | None, str]:
    """The cgroup tree to use (None: rlimits) and why, in words. `mode`: auto | cgroup | rlimits."""
    if mode == "rlimits":
        return None, "rlimits (spawner.local.limits: rlimits)"
    name = deployment_tree_name(homes_dir)
    reasons = []
    if os.geteuid() == 0:
        for make in (_v2_tree, _v1_tree):
            tree, why = make(name)
            if tree:
                return tree, why
            reasons.append(why)
    else:
        reasons.append("the hub is not root")
    if mode == "cgroup":
        raise RuntimeError(
            "spawner.local.limits is `cgroup` but no cgroup can be made here: "
            + "; ".join(reasons)
            + ". Run the hub as root with a writable /sys/fs/cgroup, or set it to `auto`."
        )
    return None, "rlimits, since " + "; ".join(reasons)


def describe(mode: str, homes_dir: str, limits: Limits, system_users: bool) -> str:
    """One line for `check` and the hub's log: which limits each user server gets, and how."""
    try:
        tree, why = choose(mode, homes_dir)
    except RuntimeError as e:
        return str(e)
    if tree:
        return f"Each user server is limited to {limits.words()}: {why}."
    caveats = ["cpu_limit is not enforced (servers run at a lower priority instead)"] if limits.cpu else []
    if limits.tasks and not system_users:
        caveats.append(
            "process_limit is not enforced, since every server runs as the hub's own account (an "
            "RLIMIT_NPROC would count all of that account's processes)"
        )
    return (
        f"Each user server is limited to {limits.words()} by {why} (memory per process)"
        + (f"; {'; '.join(caveats)}" if caveats else "")
        + "."
    )


def preexec(cgroup_dirs: list[Path], limits: Limits, own_account: bool = True):
    """What the forked server process does before it drops to the user's account: join its cgroup(s), or take the
    rlimits (RLIMIT_NPROC only where the server has an account of its own). Runs between fork and exec: no
    allocation-heavy work, no locks."""
    procs = [str(d / "cgroup.procs") for d in cgroup_dirs]

    def apply():
        if procs:
            for path in procs:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            return
        if limits.tasks and own_account:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.tasks, limits.tasks))
        if limits.mem:
            resource.setrlimit(resource.RLIMIT_DATA, (limits.mem, limits.mem))
        with contextlib.suppress(OSError):
            os.nice(RLIMIT_NICE)

    return apply


def describe_deployment(d, prune: bool = False) -> str:
    """`prune`: the hub at start-up also removes cgroups of servers that no longer run."""
    sp = d["spawner"]
    if prune:
        with contextlib.suppress(RuntimeError):
            tree, _ = choose(sp["local"]["limits"], str(d.homes_dir))
            if tree:
                tree.prune()

    return describe(
        sp["local"]["limits"],
        str(d.homes_dir),
        Limits(mem=parse_bytes(sp["mem_limit"]), cpu=sp["cpu_limit"], tasks=sp["process_limit"]),
        system_users_enabled(d),
    )
