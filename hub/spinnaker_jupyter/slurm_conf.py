"""A Slurm configuration for one machine that is controller and compute node at once (a lab PC beside its boards,
and the test suite), with SpiNNaker boards as a cluster licence (`spinnaker_board`) so that Slurm never runs more
sessions or jobs than there are boards. Everything lives under one folder, so that it never touches /etc/slurm.

Measured on Debian 12 (Slurm 22.05): see the settings' comments below.
"""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

LICENSE = "spinnaker_board"  # the licence name sbatch -L asks for, one per board


def render(
    folder: Path,
    *,
    node: str | None = None,
    node_addr: str = "127.0.0.1",
    cpus: int | None = None,
    memory_mb: int = 2000,
    boards: int = 2,
    ctld_port: int = 16817,
    slurmd_port: int = 16818,
    partition: str = "spinnaker",
    munge_socket: Path | None = None,
    share_cores: bool = False,
    jobs_per_core: int = 8,
) -> str:
    """slurm.conf text for one node named `node` (default: this host's short name, which slurmd must match).
    `share_cores`: up to `jobs_per_core` jobs share a core (memory still counts), so that more servers than cores
    run at once (Jupyter servers idle most of the time; the local spawner shares cores the same way); else each job
    has cores of its own."""
    node = node or socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 1
    folder = Path(folder)
    lines = [
        "ClusterName=spinnaker",
        f"SlurmctldHost={node}({node_addr})",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        *([f"AuthInfo=socket={munge_socket}"] if munge_socket else []),
        "SlurmUser=root",  # (a private folder owned by root; the daemons run as root here)
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",  # no cgroup plugin needed (containers, cgroup v1 or v2)
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "DefMemPerCPU=256",  # (without it a job that names no memory takes the whole node's)
        "ReturnToService=2",  # a node that comes back (slurmd restarted) is used again without an operator
        "SchedulerParameters=sched_interval=2",  # (a pending job is looked at again within seconds)
        "MinJobAge=60",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "KillWait=5",
        f"Licenses={LICENSE}:{boards}",
        f"NodeName={node} NodeAddr={node_addr} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP "
        f"OverSubscribe={f'FORCE:{jobs_per_core}' if share_cores else 'NO'}",
    ]
    return "\n".join(lines) + "\n"


def write_munge_key(path: Path) -> None:
    """A fresh 1024-byte munge key, readable only by the `munge` account (munged refuses anything looser)."""
    munge = pwd.getpwnam("munge")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    os.chown(path, munge.pw_uid, munge.pw_gid)
