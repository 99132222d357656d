"""Board leases: every spalloc job the hub creates, recorded durably, and the start-up reconciliation that gives back
the jobs nobody holds any more. No JupyterHub in here: user servers and batch jobs share it through
`boards.session.BoardSession`; each passes its own `is_held` rule. Longer than ~400 lines because the store, the
recorded claim and the reconciliation are one protocol (a row's phases), which reads best in one place.

Why: a claim waits in the service's queue for minutes, and its job URL used to live only in the memory of the hub
process. A hub killed meanwhile (kill -9, OOM, power) left the job queued at the service, where it could even be
granted a board, until the service's keepalive expiry (30-300 s). Now each claim writes a row *before* it asks the
service for a job, and the job's URL into that row the moment the service answers, before anything else is done
with it (`SpallocAllocator.claim(on_created=...)`); `claim_recorded` does this for any holder. Rows are SQLite with
``synchronous=FULL``: committed means on disk.

A row's `phase` says how far it got:

* ``creating``: about to ask (or asking) the service for a job; no URL yet.
* ``claimed``: the service made the job (URL recorded); the claim waits in the queue or the server is starting.
* ``held``: a started server (or run) holds the job.

A released or lost job's row is deleted. Each hub process has an `incarnation` (random id) and stamps the rows it
keeps alive; at start-up `reconcile()` looks at the rows of earlier, dead incarnations, against the service's own
job list (``GET jobs``):

* ``creating`` rows: the hub died between its POST and the write of the answer. The job, if the service made one,
  is found by its fingerprint: a live job of the same owner, not in any row, created within the row's window, never
  kept alive since, and of the same size and keepalive interval. It is destroyed.
* ``claimed`` rows: nobody can hold these (a start that did not finish is not resumed), so they are destroyed.
* ``held`` rows: kept when `is_held(lease)` says a live holder still has the job (a user server that outlived the
  hub restart: its spawner resumes the keepalive and adopts the row); destroyed otherwise.

Each destroyed job gets one log line. Jobs at the service that no row accounts for (other clients' jobs, another
hub's) are never touched: with an admin token the hub sees every job of the service. Rows written on another machine
(the store restored from a backup) are dropped untouched: their jobs may belong to a hub that still runs there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spalloc import (
    Allocation,
    JobState,
    JobStatus,
    SpallocAllocator,
    SpallocClient,
    SpallocError,
    SpallocRequestError,
    SpallocUnreachableError,
)

CREATING, CLAIMED, HELD = "creating", "claimed", "held"
#: How far the service's clock may be from the hub's, for the fingerprint window (seconds).
CLOCK_SKEW = 120.0
#: How long after a `creating` row the service may have created its job (a slow login and POST, with retries).
CREATE_WINDOW = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    owner TEXT NOT NULL,
    service TEXT NOT NULL,
    phase TEXT NOT NULL,
    job_url TEXT UNIQUE,
    boards INTEGER,
    keepalive REAL,
    incarnation TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    host TEXT
)
"""


@dataclass(frozen=True)
class Lease:
    """One row: a job this hub created (or is creating) for `owner`, held by `holder` (e.g. ``alice/`` for
    alice's default server)."""

    id: str
    holder: str
    owner: str
    service: str
    phase: str
    job_url: str | None
    boards: int | None
    keepalive: float | None
    incarnation: str
    created_at: float
    updated_at: float
    host: str | None = None  # the machine of the hub that wrote it (a restored backup's rows are not ours)


class LeaseStoreError(Exception):
    """The lease store cannot be used (the message names the file and what to do)."""


class LeaseStore:
    """The durable record of the hub's spalloc jobs (see the module doc). Calls are short synchronous SQLite
    transactions (a few ms, one fsync), made from the event loop's thread."""

    def __init__(self, path: str | Path, incarnation: str | None = None, host: str | None = None) -> None:
        self.path = Path(path)
        self.incarnation = incarnation or uuid.uuid4().hex
        self.host = host or socket.gethostname()
        self._check_file()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=10, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # with WAL: a commit is on disk when it returns
            self._db.execute(_SCHEMA)
            if "host" not in [row[1] for row in self._db.execute("PRAGMA table_info(leases)")]:
                self._db.execute("ALTER TABLE leases ADD COLUMN host TEXT")
        except sqlite3.Error as e:
            raise LeaseStoreError(
                f"cannot use the board lease store {self.path}: {e}. Check that the folder is "
                f"writable by the hub; remove the file if it is damaged (the next hub start "
                f"then cannot reconcile the jobs it recorded)."
            ) from e
        os.chmod(self.path, 0o600)

    def _check_file(self) -> None:
        """Refuse a store another account could have put there (or pointed elsewhere)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise LeaseStoreError(f"the board lease store {self.path} is not a regular file; remove it")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise LeaseStoreError(
                f"the board lease store {self.path} is owned by another account or writable by "
                f"others; remove it (the hub makes a fresh one)"
            )

    def close(self) -> None:
        self._db.close()

    # -- writes ---------------------------------------------------------------------------------------------------
    def _write(self, sql: str, args: tuple) -> int:
        with self._db:  # BEGIN ... COMMIT
            return self._db.execute(sql, args).rowcount

    def begin(
        self, holder: str, owner: str, service: str, *, boards: int | None = None, keepalive: float | None = None
    ) -> str:
        """Record that a job is about to be created for `owner`; returns the lease id. Call before the POST."""
        lease_id = uuid.uuid4().hex
        now = time.time()
        self._write(
            "INSERT INTO leases (id, holder, owner, service, phase, job_url, boards, keepalive, incarnation, "
            "created_at, updated_at, host) VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?)",
            (lease_id, holder, owner, service, CREATING, boards, keepalive, self.incarnation, now, now, self.host),
        )
        return lease_id

    def created(self, lease_id: str, job_url: str) -> None:
        """The service made the job: record its URL (call before anything else is done with the job)."""
        n = self._write(
            "UPDATE leases SET job_url = ?, phase = ?, updated_at = ? WHERE id = ?",
            (job_url, CLAIMED, time.time(), lease_id),
        )
        if n != 1:
            raise LeaseStoreError(f"board lease {lease_id} vanished from {self.path} while its job was created")

    def held(self, job_url: str) -> None:
        """A started holder has the job now."""
        self._write(
            "UPDATE leases SET phase = ?, incarnation = ?, host = ?, updated_at = ? WHERE job_url = ?",
            (HELD, self.incarnation, self.host, time.time(), job_url),
        )

    def adopt(self, job_url: str, holder: str, owner: str, service: str) -> None:
        """This process keeps `job_url` alive now (a holder that outlived a hub restart); records it if it was not."""
        now = time.time()
        with self._db:
            n = self._db.execute(
                "UPDATE leases SET phase = ?, incarnation = ?, host = ?, holder = ?, updated_at = ? WHERE job_url = ?",
                (HELD, self.incarnation, self.host, holder, now, job_url),
            ).rowcount
            if n == 0:
                self._db.execute(
                    "INSERT INTO leases (id, holder, owner, service, phase, job_url, boards, keepalive, incarnation, "
                    "created_at, updated_at, host) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?)",
                    (uuid.uuid4().hex, holder, owner, service, HELD, job_url, self.incarnation, now, now, self.host),
                )

    def forget(self, *, lease_id: str | None = None, job_url: str | None = None) -> None:
        """The job was released or has ended (or never came): drop its row."""
        if lease_id is not None:
            self._write("DELETE FROM leases WHERE id = ?", (lease_id,))
        if job_url is not None:
            self._write("DELETE FROM leases WHERE job_url = ?", (job_url,))

    # -- reads ----------------------------------------------------------------------------------------------------
    def leases(self) -> list[Lease]:
        rows = self._db.execute(
            "SELECT id, holder, owner, service, phase, job_url, boards, keepalive, incarnation, "
            "created_at, updated_at, host FROM leases ORDER BY created_at"
        ).fetchall()
        return [Lease(*row) for row in rows]

    def inherited(self) -> list[Lease]:
        """Rows of earlier hub processes (what `reconcile` looks at)."""
        return [lease for lease in self.leases() if lease.incarnation != self.incarnation]


_STORES: dict[str, LeaseStore] = {}


def open_store(path: str | Path) -> LeaseStore:
    """The process's one store for `path` (one incarnation per hub process)."""
    key = str(Path(path).resolve())
    if key not in _STORES:
        _STORES[key] = LeaseStore(path)
    return _STORES[key]


# --------------------------------------------------------------------------------------------------- claims
async def claim_recorded(
    allocator: SpallocAllocator,
    store: LeaseStore | None,
    owner: str,
    *,
    holder: str,
    n_boards: int | None = None,
    **claim: Any,
) -> Allocation:
    """`allocator.claim(owner, ...)` with its job recorded in `store` (any holder: a user server, a batch job).

    The row is written before the service is asked and gets the job's URL the moment the service answers. When the
    claim fails, the row goes once the service confirmed the job's end (or when no job was made); a row left behind
    (a process shut down mid-claim, a POST that may have reached the service) is settled by the next `reconcile`.
    On success the row stays (phase ``claimed``): the caller marks it `held` once its holder has started and
    `forget`s it after the release. `claim` takes the other keywords of `SpallocAllocator.claim`.
    """
    n = n_boards or allocator.boards
    if store is None:
        return await allocator.claim(owner, n_boards=n, **claim)
    lease_id = store.begin(
        holder, owner, allocator.client().service_url, boards=n, keepalive=allocator.keepalive_interval
    )
    made: list[str] = []

    def created(job: Any) -> None:
        made.append(job.url)
        store.created(lease_id, job.url)  # durable before the claim does anything else with the job

    def released(job: Any) -> None:
        store.forget(lease_id=lease_id)  # (only once the service confirmed the end: else the next start does)

    settled = False  # no job can exist, or the outcome is known
    try:
        allocation = await allocator.claim(owner, n_boards=n, on_created=created, on_released=released, **claim)
        return allocation
    except SpallocUnreachableError:
        raise  # (a POST that may have reached the service: the row stays for `reconcile`)
    except BaseException:
        settled = True
        raise
    finally:
        if settled and not made:
            store.forget(lease_id=lease_id)  # no job was made


# --------------------------------------------------------------------------------------------------- reconcile
@dataclass
class ReconcileReport:
    """What one reconciliation found and did."""

    listed: int = 0  # live jobs the service listed
    kept: list[str] = field(default_factory=list)  # job URLs a live holder still has
    destroyed: list[str] = field(default_factory=list)
    forgotten: int = 0  # rows of jobs that had ended anyway
    error: str | None = None


IsHeld = Callable[[Lease], bool | Awaitable[bool]]

#: Holders of batch jobs' claims are ``job:<id>`` (the job service's runner); a server's is always ``user/name``.
JOB_HOLDER = "job:"


def held_by_a_job(lease: Lease) -> bool:
    return lease.holder.startswith(JOB_HOLDER) and "/" not in lease.holder


def held_by_a_server(lease: Lease) -> bool:
    return not held_by_a_job(lease)


def _matches(lease: Lease, st: JobStatus) -> bool:
    """Could `st` be the job the service made for this `creating` row (see the module doc)?"""
    if st.owner != lease.owner or st.state is JobState.DESTROYED or st.start_time is None:
        return False
    if not lease.created_at - CLOCK_SKEW <= st.start_time <= lease.created_at + CREATE_WINDOW + CLOCK_SKEW:
        return False
    if st.keepalive_time is not None and st.keepalive_time - st.start_time > 2.0:
        return False  # kept alive since: some live client has it (the hub's claim never sent one)
    req = st.original_request
    if lease.boards is not None and isinstance(req.get("num-boards"), int) and req["num-boards"] != lease.boards:
        return False
    if (
        lease.keepalive is not None
        and st.keepalive_interval is not None
        and abs(st.keepalive_interval - lease.keepalive) > 0.5
    ):
        return False
    return True


async def reconcile(
    store: LeaseStore,
    client: SpallocClient,
    *,
    is_held: IsHeld,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    reason: str = "the hub restarted and no server of it holds this job",
    scope: Callable[[Lease], bool] = held_by_a_server,
) -> ReconcileReport:
    """Give back every job recorded by an earlier hub process that no live holder has (see the module doc).

    Only the rows `scope` accepts are looked at: by default the servers'. Batch jobs' rows belong to the job
    service's runner, which lives on its own (it may be claiming or running while the hub starts) and reconciles
    its own rows at its start (`scope=held_by_a_job`)."""
    log = log or logging.getLogger(__name__)
    report = ReconcileReport()

    def ours(lease: Lease) -> bool:
        return lease.service == client.service_url and lease.host in (None, store.host)

    inherited = [lease for lease in store.inherited() if ours(lease) and scope(lease)]
    for lease in [lease for lease in store.inherited() if scope(lease)]:
        if lease.host not in (None, store.host):
            # A backup restored onto another machine: the jobs may be those of a hub still running elsewhere.
            log.warning(
                "SpiNNaker jobs: lease of %s for %s was recorded on another machine (%s; a restored "
                "backup?): not touched here; it ends at the service when nobody keeps it alive",
                lease.job_url or "a job",
                lease.owner,
                lease.host,
            )
            store.forget(lease_id=lease.id)
        elif lease.service != client.service_url:
            log.warning(
                "SpiNNaker jobs: lease of %s for %s is at another allocation service (%s; the setting "
                "changed?); it ends there when its keepalive interval passes",
                lease.job_url or "a job",
                lease.owner,
                lease.service,
            )
            store.forget(lease_id=lease.id)
    try:
        live = await client.list_jobs()
    except SpallocError as e:
        report.error = str(e)
        log.warning(
            "SpiNNaker jobs: cannot list the allocation service's jobs to reconcile (%s); the %d job(s) "
            "recorded by the last hub process stay recorded until the next start",
            e,
            len(inherited),
        )
        return report
    report.listed = len(live)
    live_set = set(live)

    async def destroy(url: str, owner: str, why: str) -> None:
        try:
            await client.job(url).destroy(why)
            report.destroyed.append(url)
            log.warning("SpiNNaker jobs: destroyed %s of %s: %s", url, owner, why)
        except SpallocError as e:
            log.warning(
                "SpiNNaker jobs: could not destroy %s of %s (%s); the service ends it after its keepalive interval",
                url,
                owner,
                e,
            )

    # Jobs the service made for `creating` rows (the hub died between the POST and recording the answer).
    creating = [lease for lease in inherited if lease.phase == CREATING]
    if creating:
        known = {lease.job_url for lease in store.leases() if lease.job_url}
        for url in live:
            if url in known:
                continue
            try:
                st = await client.job(url).status()
            except SpallocRequestError as e:
                if e.status in (403, 404, 410):
                    continue  # not visible to the hub's account: not one of its jobs
                raise
            except SpallocError as e:  # e.g. a URL of another host: never sent the hub's credentials
                log.debug("SpiNNaker jobs: skipping %s (%s)", url, e)
                continue
            match = next((lease for lease in creating if _matches(lease, st)), None)
            if match is not None:
                await destroy(
                    url,
                    st.owner or match.owner,
                    f"{reason} (created for {match.holder} by a hub process that stopped before it "
                    f"could record the job)",
                )
        for lease in creating:
            store.forget(lease_id=lease.id)

    for lease in inherited:
        if lease.phase == CREATING or lease.job_url is None:
            continue
        if lease.phase == HELD:
            held = is_held(lease)
            if asyncio.iscoroutine(held) or isinstance(held, asyncio.Future):
                held = await held
            if held:
                report.kept.append(lease.job_url)
                continue
        if lease.job_url in live_set:
            what = "its claim was still waiting" if lease.phase == CLAIMED else f"held by {lease.holder}"
            await destroy(lease.job_url, lease.owner, f"{reason} ({what} when the last hub process stopped)")
        else:
            report.forgotten += 1
        store.forget(lease_id=lease.id)
    log.info(
        "SpiNNaker jobs reconciled with %s: %d live job(s) listed, %d held by servers that outlived the "
        "restart, %d destroyed, %d ended meanwhile",
        client.service_url,
        report.listed,
        len(report.kept),
        len(report.destroyed),
        report.forgotten,
    )
    return report


__all__ = [
    "CLAIMED",
    "CREATING",
    "HELD",
    "JOB_HOLDER",
    "Lease",
    "LeaseStore",
    "LeaseStoreError",
    "ReconcileReport",
    "claim_recorded",
    "held_by_a_job",
    "held_by_a_server",
    "open_store",
    "reconcile",
]
