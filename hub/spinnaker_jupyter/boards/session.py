"""`BoardSession`: the life of one holder's SpiNNaker board, from the claim to the release, with no JupyterHub in it.

A holder is a user server (`mixin.BoardsMixin` adapts this to a JupyterHub spawner) or a batch job. Per mode:

* ``session``: claim boards from the spalloc service (`leases.claim_recorded`: the job is recorded durably before
  the claim waits), keep the job alive while the holder runs, destroy it at the release. After a hub restart
  `resume()` takes over the keepalive of the recorded job; a job the service ended is recorded as lost.
* ``machine``: the lab's own board (`lock.board_lock`), one holder at a time, waited for up to ``claim_timeout``.
* ``virtual`` / ``per-run``: nothing to claim.

When no board comes, ``on_timeout`` decides: ``virtual`` gives a virtual-mode record with a notice, ``fail`` raises
`NoBoard`. Every step is said through ``say(percent, message)``; every change worth storing at once (a lost job)
through ``on_change()``.

(Somewhat over 400 lines: one class, because the claim, resume and release paths share the cancellation and
"stopping" rules and are only safe read together.)
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spinnaker_server_contract import ServerContract

from .. import leases
from ..spalloc import (
    Allocation,
    ClaimProgress,
    JobState,
    SpallocAllocator,
    SpallocError,
    SpallocJobDestroyedError,
    SpallocRequestError,
    SpallocTimeoutError,
)
from ..spynnaker_cfg import ClaimedBoards
from ..spynnaker_cfg import text as spynnaker_cfg_text
from .lock import BoardLockError, board_lock, words
from .record import BoardRecord, now_iso

Say = Callable[[int | None, str], None]


class NoBoard(Exception):
    """No board came and ``spinnaker.on_timeout`` is ``fail``: the holder must not start. The message says why."""


class BoardSession:
    """One holder's boards (see the module doc). Not thread-safe: use it from one event loop.

    `settings` is the deployment's validated ``spinnaker:`` section (with its defaults). `owner` is the user the
    boards are claimed for (the spalloc job's owner); `name` tells this holder from the owner's others (a server
    name, a job id); `holder` labels its lease row (default ``owner/name``); `noun` names the holder in what its
    user is told ("server", "job").
    """

    def __init__(
        self,
        settings: dict,
        *,
        owner: str,
        name: str = "",
        holder: str | None = None,
        allocator: SpallocAllocator | None = None,
        lease_store: str | Path | None = None,
        record: BoardRecord | None = None,
        say: Say | None = None,
        on_change: Callable[[], Any] | None = None,
        log: logging.Logger | logging.LoggerAdapter | None = None,
        label: str | None = None,
        noun: str = "server",
    ) -> None:
        self.settings = settings
        self.owner, self.name = owner, name
        self.holder = holder or f"{owner}/{name}"
        self.label = label or self.holder  # how log lines name the holder
        self.noun = noun
        self.record = record
        self.cfg: str | None = None  # the sPyNNaker cfg text of what was claimed (None: the deployment's)
        self.allocation: Allocation | None = None  # the live keepalive of the job (session mode)
        self.stopping = False  # release() has begun: a claim or resume that finishes now gives its board back
        self._allocator = allocator
        self._lease_store = lease_store
        self._say_cb = say
        self._on_change = on_change
        self.log = log or logging.getLogger(__name__)
        self._claim_task: asyncio.Future | None = None
        self._resume_task: asyncio.Future | None = None

    # -- collaborators ------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """The deployment's ``spinnaker.mode``."""
        return self.settings["mode"]

    @property
    def who(self) -> tuple[str, str]:
        """(owner, name): this holder at the lab board's lock."""
        return (self.owner, self.name)

    def allocator(self) -> SpallocAllocator:
        """The spalloc client the session claims and releases with (the one given, else an unconfigured one)."""
        if self._allocator is None:
            self._allocator = SpallocAllocator(log=self.log)
        return self._allocator

    def leases(self) -> leases.LeaseStore | None:
        """The lease store recording this holder's jobs (None: not recorded)."""
        return leases.open_store(self._lease_store) if self._lease_store else None

    def _say(self, percent: int | None, message: str) -> None:
        if self._say_cb is not None:
            self._say_cb(percent, message)
        else:
            self.log.info("[%s] %s", self.owner, message)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def deployment_cfg(self, mode: str | None = None) -> str:
        """The deployment's own sPyNNaker cfg, for `mode` (default: the configured one)."""
        return spynnaker_cfg_text(self.settings, mode=mode or self.mode)

    # -- what it holds --------------------------------------------------------------------------------------------
    @property
    def holds(self) -> bool:
        """Something to give back: a live job, the lab board, or a claim still waiting."""
        return bool(self.record and self.record.holds) or self.claiming

    @property
    def _ends(self) -> str:
        return "server stops" if self.noun == "server" else f"{self.noun} ends"

    @property
    def claiming(self) -> bool:
        """A claim is waiting (in the service's queue, or for the lab board)."""
        return self._claim_task is not None and not self._claim_task.done()

    @property
    def resuming(self) -> bool:
        """A `resume_soon()` is under way."""
        return self._resume_task is not None and not self._resume_task.done()

    # -- claim ----------------------------------------------------------------------------------------------------
    async def claim(self, n_boards: int = 1) -> BoardRecord:
        """Claim what the mode needs for this holder and return the record (also in `record`; the cfg in `cfg`).

        Waits up to ``claim_timeout`` (saying the queue position or the lab board's holder). No board in time:
        a virtual fallback record with a notice, or `NoBoard` (``on_timeout: fail``). Released meanwhile
        (`release()` during the wait): gives the board back and raises `asyncio.CancelledError`.
        """
        self.stopping, self.record, self.cfg, self.allocation = False, None, None, None
        if self.mode == "session":
            await self._claim_session(n_boards)
        elif self.mode == "machine":
            await self._claim_machine()
        else:
            self.record = BoardRecord(mode=self.mode)
        return self.record

    async def _claim_session(self, n: int) -> None:
        sp = self.settings
        boards = "a SpiNNaker board" if n == 1 else f"{n} SpiNNaker boards"
        self._say(5, f"Claiming {boards} for your session from the SpiNNaker allocation service")
        record = self.record = BoardRecord(mode="session", boards=n, state="REQUESTED")
        last: dict[str, Any] = {}

        def progress(p: ClaimProgress) -> None:
            last.update(state=p.state, job=p.job_id)
            record.job_url, record.job_id, record.state = p.job_url, p.job_id, p.state.value
            self._say(None, p.message)

        failed = None
        try:
            # Recorded durably before the service is asked, the job's URL the moment it answers (leases.py).
            self._claim_task = asyncio.ensure_future(
                leases.claim_recorded(
                    self.allocator(),
                    self.leases(),
                    self.owner,
                    holder=self.holder,
                    n_boards=n,
                    collab=sp["spalloc"]["collab"],
                    progress=progress,
                    on_lost=self.on_lost,
                    timeout=float(sp["claim_timeout"]),
                )
            )
            allocation = await self._claim_task
        except SpallocTimeoutError:
            job = f"job {last['job']} was still {last['state'].value.lower()}" if last else "no answer yet"
            failed = f"no SpiNNaker board became free within {words(sp['claim_timeout'])} ({job})"
        except SpallocError as e:
            self.log.error("%s: claiming boards failed: %s", self.label, e)
            failed = str(e).rstrip(".")
        except leases.LeaseStoreError as e:
            self.log.error("%s: %s", self.label, e)
            failed = f"the hub could not record its SpiNNaker job ({e})"
        except asyncio.CancelledError:
            record.released = True  # a cancelled claim destroys its own job
            raise
        finally:
            self._claim_task = None
        if failed is not None:
            record.released = True  # a claim that fails destroys its own job
            return self._no_board(failed)
        if self.stopping:  # released while waiting (e.g. start timeout): the claim came too late
            await allocation.release(f"user {self.noun} stopped before its boards were ready")
            self._forget_lease(allocation.job_url)
            record.released = True
            raise asyncio.CancelledError()
        self.allocation = allocation
        self.record = BoardRecord(
            mode="session",
            boards=allocation.machine.n_boards,
            board=allocation.root_host,
            version=allocation.version,
            job_id=allocation.job_id,
            job_url=allocation.job_url,
            state=JobState.READY.value,
            claimed_at=now_iso(),
        )
        claimed = ClaimedBoards(allocation.root_host, allocation.version, allocation.job_url, self.owner, n)
        self.cfg = spynnaker_cfg_text(self.settings, claimed=claimed)

    async def _claim_machine(self) -> None:
        sp = self.settings
        name = sp["machine_name"]
        lock = board_lock(name)
        if not lock.try_take(self.who, self.noun):
            self._claim_task = asyncio.ensure_future(
                lock.take(self.who, float(sp["claim_timeout"]), lambda m: self._say(None, m), self.noun)
            )
            try:
                taken = await self._claim_task
            finally:
                self._claim_task = None
            if not taken:
                holder = lock.holder_words(self.owner)
                waited = f" within {words(sp['claim_timeout'])}" if sp["claim_timeout"] else ""
                return self._no_board(
                    f"the lab's board {name} did not become free{waited}: it is in use by "
                    f"{holder}, and is free again when that {self._ends}"
                )
        if self.stopping:
            lock.release(self.who)
            raise asyncio.CancelledError()
        self._say(5, f"The lab's SpiNNaker board {name} is yours until your {self._ends}")
        self.record = BoardRecord(mode="machine", board=name, version=sp["version"], held=True, claimed_at=now_iso())
        self.cfg = self.deployment_cfg("machine")

    def _no_board(self, reason: str) -> None:
        if self.settings["on_timeout"] == "fail":
            raise NoBoard(
                f"No SpiNNaker board for your {self.noun}: {reason}. This service starts {self.noun}s only "
                f"with a board; try again later."
            )
        notice = (
            f"No SpiNNaker board for this session: {reason}. It runs in virtual mode: run() maps and loads "
            f"your network but recorded data come back empty. Restart your {self.noun} later to try again for a "
            f"board."
        )
        self._say(None, notice)
        self.record = BoardRecord(mode=self.mode, fallback="virtual", notice=notice, since=now_iso())
        self.cfg = self.deployment_cfg("virtual")

    def started(self) -> None:
        """The holder has started with its boards: its lease is `held` now (kept across a hub restart)."""
        store = self.leases()
        if store is not None and self.record is not None and self.record.has_live_job:
            store.held(self.record.job_url)

    # -- after a hub restart ----------------------------------------------------------------------------------------
    def retake_lab_board(self) -> bool:
        """Re-register the lab board lock of a restored record that holds it (the lock dies with its process).
        False when another holder has it already (logged: the board is recorded as held twice)."""
        r = self.record
        if r is None or r.mode != "machine" or not r.held:
            return True
        since = calendar.timegm(time.strptime(r.claimed_at, "%Y-%m-%dT%H:%M:%SZ")) if r.claimed_at else None
        lock = board_lock(r.board)
        try:
            if lock.try_take(self.who, self.noun, since):
                return True
        except BoardLockError as e:
            self.log.error("%s: %s", self.label, e)
            return False
        self.log.error(
            "%s: the lab board %s is recorded as held by two holders (now %s)",
            self.label,
            r.board,
            lock.holder_words(self.owner),
        )
        return False

    def needs_resume(self) -> bool:
        """A restored session-mode job that nobody keeps alive in this process, and no release or resume under way."""
        return self._has_unkept_job() and not self.stopping and not self.resuming

    def _has_unkept_job(self) -> bool:
        r = self.record
        return r is not None and r.mode == "session" and r.has_live_job and self.allocation is None

    def resume_soon(self) -> asyncio.Future:
        """`resume()` in the background (e.g. from a poll, which must not wait for the service)."""
        self._resume_task = asyncio.ensure_future(self.resume())
        return self._resume_task

    async def resume(self) -> None:
        """Take over the keepalive of the recorded job (a holder that outlived a hub restart). A job the service
        ended meanwhile is recorded as lost (`on_lost`); a service that cannot be reached is tried again at the
        next call."""
        url = self.record.job_url
        try:
            allocation = await self.allocator().resume(url, on_lost=self.on_lost, timeout=60)
        except SpallocJobDestroyedError as e:
            await self.on_lost(f"{e.reason or 'ended'} (while the hub was not keeping it alive)")
            return
        except SpallocRequestError as e:
            if e.status in (404, 410):
                await self.on_lost("the allocation service no longer knows this job")
            else:
                self.log.warning("%s: cannot resume %s yet (%s); trying again at the next poll", self.label, url, e)
            return
        except SpallocError as e:
            self.log.warning("%s: cannot resume %s yet (%s); trying again at the next poll", self.label, url, e)
            return
        if self.stopping or self.record is None or self.record.job_url != url:
            await allocation.job.stop_keepalive()
            return
        self.allocation = allocation
        store = self.leases()
        if store is not None:
            store.adopt(url, self.holder, self.owner, allocation.job.client.service_url)
        self.log.info(
            "%s: resumed the keepalive of SpiNNaker job %s (board %s)",
            self.label,
            allocation.job_id,
            allocation.root_host,
        )

    # -- lost and released ------------------------------------------------------------------------------------------
    async def on_lost(self, reason: str) -> None:
        """The service ended the job while the holder runs: record it as lost (the holder runs on without its
        board until restarted) and say so through `on_change`."""
        r = self.record
        if self.stopping or r is None or not r.job_url:
            return
        self._forget_lease(r.job_url)
        r.lost, r.lost_at, r.state = reason, now_iso(), JobState.DESTROYED.value
        self.allocation = None
        self.log.warning(
            "%s: the SpiNNaker allocation service ended job %s: %s. The %s keeps running "
            "without its board until it is restarted.",
            self.label,
            r.job_id,
            reason,
            self.noun,
        )
        self._changed()

    async def release(self, reason: str) -> None:
        """Give back whatever this holder has (idempotent, on every path): a claim still waiting, a resume under way,
        the spalloc job, the lab board. The record stays, marked released."""
        self.stopping = True
        claim_cancelled = self.claiming
        for task in (self._claim_task, self._resume_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - cancelled on purpose
                    pass
        r = self.record
        if r is not None:
            if claim_cancelled and r.mode == "session":
                r.released = True  # a cancelled claim destroys its own job
            await self._release_record(r, reason)
        self.allocation = None

    async def _release_record(self, r: BoardRecord, reason: str) -> None:
        if r.mode == "machine" and r.held:
            board_lock(r.board).release(self.who)
            r.held = False
            self.log.info("%s: released the lab board %s (%s)", self.label, r.board, reason)
        if r.has_live_job:
            r.released = True  # (before the request: a second release meanwhile sends nothing)
            try:
                if self.allocation is not None:
                    await self.allocation.release(reason)
                else:
                    await self.allocator().release(r.job_url, reason)
                self.log.info("%s: released SpiNNaker job %s (%s)", self.label, r.job_id, reason)
                self._forget_lease(r.job_url)  # (kept when the release failed: the next hub start retries it)
            except SpallocError as e:
                self.log.warning(
                    "%s: could not release SpiNNaker job %s (%s); the service ends it after its keepalive interval",
                    self.label,
                    r.job_url,
                    e,
                )

    def _forget_lease(self, url: str | None) -> None:
        store = self.leases()
        if store is not None and url:
            try:
                store.forget(job_url=url)
            except Exception:  # noqa: BLE001 - the next hub start finds the job ended and drops the row
                self.log.exception("%s: could not update the board lease store", self.label)

    # -- for people ---------------------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The holder's SPINNAKER_* environment: its one sPyNNaker cfg (text) and what it holds, for people."""
        r = self.record or BoardRecord(mode=self.mode)
        job = r.job_id is not None
        return ServerContract(
            mode=r.mode,
            machine_cfg=self.cfg or self.deployment_cfg(),
            board=str(r.board) if r.board and not r.fallback else None,
            board_job=str(r.job_id) if job else None,
            board_job_url=str(r.job_url) if job else None,
            board_notice=r.notice or None,
        ).to_env()

    async def status(self, live: bool = True) -> dict[str, Any]:
        """The record as a dict, with the keepalive's state, the lab board's holder and (`live`) the job's state
        at the service now (``live`` or ``live_error``; never raises)."""
        r = self.record
        out: dict[str, Any] = r.to_dict() if r is not None else {}
        out.setdefault("mode", self.mode)
        if r is not None and r.job_url:
            out["keepalive"] = (
                "running"
                if self.allocation is not None and self.allocation.job.keepalive_running
                else "resuming"
                if self.resuming
                else "stopped"
            )
        if live and r is not None and r.job_url and not r.released:
            try:
                status = await asyncio.wait_for(self.allocator().client().job(r.job_url).status(), 10)
                out["live"] = {
                    "state": status.state.value,
                    "reason": status.reason,
                    "owner": status.owner,
                    "keepalive_host": status.keepalive_host,
                    "checked_at": now_iso(),
                }
            except Exception as e:  # noqa: BLE001 - said to the asker, never raised
                out["live_error"] = str(e) or type(e).__name__
        if r is not None and r.mode == "machine":
            lock = board_lock(r.board or self.settings["machine_name"])
            out["holder"] = "/".join(lock.holder) if lock.holder else None
        return out


__all__ = ["BoardSession", "NoBoard"]
