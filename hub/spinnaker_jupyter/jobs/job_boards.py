"""SpiNNaker boards for batch jobs: the deployment's `spinnaker.mode`, carried out by the runner through the same
`boards.session.BoardSession` that user servers use (claim, keepalive, release, lost), one per running job.

* ``session``: boards are claimed from the spalloc service when the job's command is about to run (its wait in the
  service's queue said in the job's log and its state), kept alive while it runs, and released when it ends, in
  every way it can end (finished, error, cancelled, time limit, service stop). Each claim is a row of the hub's
  lease store with the holder ``job:<id>``: the hub's start-up reconciliation leaves those rows alone (a hub start
  must not destroy a running job's board), and the runner reconciles them itself at its start, so the job of a
  runner killed with -9 is given back there (the job itself is put back in the queue).
* ``machine``: the lab's board, one holder at a time (waited for like a claim): the same lock file as the hub's
  (`boards.lock`, under data_dir/hub), so a job waits for a user server that has the board and the other way
  round, and the log says who has it.
* ``virtual``: a virtual board, said in the log and provenance. ``per-run``: the job's sPyNNaker claims its boards
  itself with its owner's token (per_run.py); nothing for the runner to claim here.

The job's sPyNNaker cfg (naming its boards) is written where only the job's account can read it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .. import leases
from ..boards.session import BoardSession, NoBoard
from ..boards.share import boards_share
from ..spalloc import SpallocAllocator

log = logging.getLogger("spinnaker_jupyter.jobs")
#: Cores of one SpiNN-5 board (48 chips of 18 cores): what resource_usage counts per board-hour.
CORES_PER_BOARD = 48 * 18


def holder(job_id: int) -> str:
    return f"{leases.JOB_HOLDER}{job_id}"


def boards_for(spinnaker: dict, user: str, groups: list[str] = ()) -> int:
    """The boards a user's job gets unless it asks for fewer (as for their server: per user, per group, default)."""
    sp = spinnaker["spalloc"]
    return boards_share(user, groups, sp["boards_per_user"], sp["boards_per_group"], sp["boards"])


def max_boards(spinnaker: dict, user: str | None = None, groups: list[str] = ()) -> int:
    """The most boards a job may ask for (hardware_config.boards): the user's share in session mode (any user's
    when `user` is None), one otherwise (a lab board, or a virtual one)."""
    if spinnaker["mode"] != "session":
        return 1
    if user is not None:
        return boards_for(spinnaker, user, groups)
    sp = spinnaker["spalloc"]
    return max(
        [int(sp["boards"]), *map(int, sp["boards_per_user"].values()), *map(int, sp["boards_per_group"].values())]
    )


class JobBoards:
    """What the runner needs of the deployment's boards: a BoardSession per job, and the start-up reconciliation
    of the rows of jobs a dead runner held."""

    def __init__(
        self, spinnaker: dict, lease_file: Path | None = None, token_provider=None, ca_certs: str | None = None
    ) -> None:
        self.spinnaker = spinnaker
        self.lease_file = lease_file if self.mode == "session" else None
        self._allocator: SpallocAllocator | None = None
        self._token_provider, self._ca_certs = token_provider, ca_certs

    @classmethod
    def from_deployment(cls, d) -> JobBoards:
        from ..boards.hubconfig import LEASE_FILE
        from ..boards.lock import use_deployment

        sp = d["spinnaker"]
        if sp["mode"] == "machine":
            use_deployment(d)  # the lab board's lock, shared with the hub's servers
        ca = str(d.path(sp["spalloc"]["ca_certs"], Path())) if sp["spalloc"]["ca_certs"] else None
        return cls(sp, d.hub_dir / LEASE_FILE, d.spalloc_token if sp["mode"] == "session" else None, ca)

    @property
    def mode(self) -> str:
        return self.spinnaker["mode"]

    @property
    def real(self) -> bool:
        """Jobs get real boards (session, machine); otherwise they run virtual."""
        return self.mode in ("session", "machine")

    def allocator(self) -> SpallocAllocator:
        if self._allocator is None:
            sp, a = self.spinnaker, self.spinnaker["spalloc"]
            kwargs = {
                "url": a["url"] or "",
                "keepalive_interval": float(a["keepalive_interval"]),
                "claim_timeout": float(sp["claim_timeout"]),
                "boards": a["boards"],
                "machine_name": a["machine_name"],
                "tags": a["tags"],
                "group": a["group"],
                "token_provider": self._token_provider,
            }
            if self._ca_certs:
                kwargs["ca_certs"] = self._ca_certs
            self._allocator = SpallocAllocator(log=log, **kwargs)
        return self._allocator

    def session(self, job_id: int, owner: str, say, on_change=None) -> BoardSession:
        return BoardSession(
            self.spinnaker,
            owner=owner,
            name=f"job {job_id}",
            holder=holder(job_id),
            allocator=self.allocator() if self.mode == "session" else None,
            lease_store=self.lease_file,
            say=say,
            on_change=on_change,
            log=log,
            label=f"job {job_id} of {owner}",
            noun="job",
        )

    async def reconcile(self) -> leases.ReconcileReport | None:
        """At the runner's start: give back the boards of jobs a dead runner held (their jobs were put back in the
        queue by `Runner.recover`, so nothing holds them now). Never the servers' rows: those are the hub's."""
        if self.lease_file is None or not self.spinnaker["spalloc"]["url"]:
            return None
        try:
            store = leases.open_store(self.lease_file)
            return await leases.reconcile(
                store,
                self.allocator().client(),
                is_held=lambda lease: False,
                log=log,
                reason="the job service restarted and no job of it holds this board",
                scope=leases.held_by_a_job,
            )
        except Exception:  # noqa: BLE001 - the service's keepalive expiry still ends them
            log.exception("SpiNNaker jobs: the job service could not reconcile its boards with the allocation service")
            return None

    async def close(self) -> None:
        if self._allocator is not None:
            await self._allocator.close()


def write_cfg(folder: Path, text: str, gid: int | None) -> Path:
    """The job's own sPyNNaker cfg in `folder` (made fresh), readable by the job's group only; returns the folder
    to give the job as XDG_CONFIG_DIRS."""
    folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    path = folder / ".spynnaker.cfg"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if gid is not None and os.geteuid() == 0:
        os.chown(folder, 0, gid)
        os.chown(path, 0, gid)
    os.chmod(folder, 0o750)
    os.chmod(path, 0o640)
    return folder


__all__ = ["CORES_PER_BOARD", "JobBoards", "NoBoard", "boards_for", "holder", "max_boards", "write_cfg"]
