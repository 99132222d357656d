"""`BoardsMixin`: the spawner side of SpiNNaker boards (the package's docstring says what each mode does)."""

from __future__ import annotations

import asyncio
import copy
import os
from typing import Any, Optional

from jupyterhub.spawner import SpawnException
from traitlets import Dict, List, Unicode
from traitlets.config import LoggingConfigurable

from .. import leases
from ..spalloc import (ClaimProgress, JobState, SpallocAllocator, SpallocError, SpallocJobDestroyedError,
                       SpallocRequestError, SpallocTimeoutError)
from ..spynnaker_cfg import ClaimedBoards
from ..spynnaker_cfg import text as spynnaker_cfg_text
from .lock import board_lock, now_iso as _now_iso, words as _words

STATE_KEY = "spinnaker"


class NoBoardError(SpawnException):
    """A start refused because no board came (spinnaker.on_timeout: fail); the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="spinnaker_no_board", status_code=503)
        self.jupyterhub_message = message  # what the spawn page says



class BoardsMixin(LoggingConfigurable):
    """SpiNNaker boards for a Spawner: claim before start, release after stop, state persisted (see module doc).
    Configure with ``c.BoardsMixin.spinnaker_config`` (the deployment's validated `spinnaker:` section) and
    ``c.SpallocAllocator.*``; `configure_hub()` does both from the deployment config."""

    spinnaker_config = Dict(
        help="The deployment's `spinnaker:` config section (mode, version, machine_name, claim_timeout, "
             "on_timeout, spalloc, extra_cfg).").tag(config=True)
    service_env = Dict(
        help="Environment defaults for `per-run` servers: how spinnman reaches the hub's access-token-service "
             "(JUPYTERHUB_SERVICE_HOST/PORT). Values already in the environment win.").tag(config=True)
    path_append = List(Unicode(), help="Folders appended to the servers' PATH (the `spinnaker-status` "
                                       "command).").tag(config=True)
    lease_store = Unicode(
        "", help="SQLite file recording every spalloc job the hub creates (`leases.LeaseStore`), so a restarted "
                 "hub can give back the jobs of claims and servers it lost. Empty: not recorded.").tag(config=True)

    _allocator: Optional[SpallocAllocator] = None  # one per hub process, shared by all spawners

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._board: dict[str, Any] = {}
        self._board_cfg: Optional[str] = None
        self._allocation = None
        self._claim_task: Optional[asyncio.Future] = None
        self._unreleased: Optional[tuple[dict, Any]] = None  # held when the state was cleared, until released
        self._resume_task: Optional[asyncio.Future] = None
        self._boards_in_start = False
        self._boards_stopping = False
        self._stop_called = False

    # -- configuration ---------------------------------------------------------------------------------------
    @property
    def spinnaker(self) -> dict:
        from ..schema import SCHEMA, defaults

        base = defaults(SCHEMA["properties"]["spinnaker"])
        from ..config import merge

        return merge(base, self.spinnaker_config or {})

    @property
    def board_mode(self) -> str:
        return self.spinnaker["mode"]

    def allocator(self) -> SpallocAllocator:
        cls = BoardsMixin
        if cls._allocator is None:
            cls._allocator = SpallocAllocator(config=self.config, log=self.log)
        return cls._allocator

    def leases(self) -> Optional[leases.LeaseStore]:
        return leases.open_store(self.lease_store) if self.lease_store else None

    @property
    def _holder(self) -> str:
        return f"{self.user.name}/{self.name or ''}"

    def boards_wanted(self) -> int:
        sp = self.spinnaker["spalloc"]
        if self.user.name in sp["boards_per_user"]:
            return int(sp["boards_per_user"][self.user.name])
        groups = [g.name for g in getattr(self.user, "groups", []) or []]
        per_group = [int(sp["boards_per_group"][g]) for g in groups if g in sp["boards_per_group"]]
        return max(per_group) if per_group else int(sp["boards"])

    @property
    def _who(self) -> tuple[str, str]:
        return (self.user.name, self.name or "")

    def _deployment_cfg(self, mode: Optional[str] = None) -> str:
        return spynnaker_cfg_text(self.spinnaker, mode=mode or self.board_mode)

    # -- progress ----------------------------------------------------------------------------------------------
    def progress_reset(self) -> None:
        # The spawner's own start() resets its progress; keep the board messages said before it on the page.
        if self._boards_in_start:
            return
        parent = getattr(super(), "progress_reset", None)
        if parent:
            parent()

    def _say(self, percent: Optional[int], message: str) -> None:
        say = getattr(self, "progress_say", None)
        if say:
            say(percent, message)
        else:
            self.log.info("[%s] %s", self.user.name, message)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self):
        if self._unreleased is not None:  # (the hub never ran the post-stop hook of the last server)
            (board, allocation), self._unreleased = self._unreleased, None
            await self._release_record(board, allocation, "user server no longer running")
        self.progress_reset()
        self._board, self._board_cfg, self._allocation = {}, None, None
        self._boards_stopping = self._stop_called = False
        mode = self.board_mode
        if mode == "session":
            await self._claim_session()
        elif mode == "machine":
            await self._claim_machine()
        else:
            self._board = {"mode": mode}
        self._boards_in_start = True
        try:
            started = await super().start()
            url = self._board.get("job_url")
            store = self.leases()
            if store is not None and url and not self._board.get("released"):
                store.held(url)
            return started
        except BaseException:
            await asyncio.shield(self._release_boards("the server failed to start"))
            raise
        finally:
            self._boards_in_start = False

    async def stop(self, now: bool = False):
        self._stop_called = True
        return await super().stop(now=now)

    def run_post_stop_hook(self):
        # Called by the hub after every stop: also when its poll found the server gone (then stop() is not).
        return self._post_stop(super().run_post_stop_hook())

    async def _post_stop(self, upstream) -> None:
        reason = ("user server stopped" if self._stop_called
                  else "user server ended unexpectedly (noticed by the hub)")
        await self._release_boards(reason)
        if asyncio.iscoroutine(upstream) or isinstance(upstream, asyncio.Future):
            await upstream

    async def poll(self):
        status = await super().poll()
        if status is None and self._needs_resume():
            self._resume_task = asyncio.ensure_future(self._resume())
        return status

    # -- state -------------------------------------------------------------------------------------------------
    def get_state(self):
        state = super().get_state()
        if self._board:
            state[STATE_KEY] = copy.deepcopy(self._board)
        return state

    def load_state(self, state):
        super().load_state(state)
        board = dict((state or {}).get(STATE_KEY) or {})
        self._board = board
        if not board:
            return
        orm_spawner = getattr(self, "orm_spawner", None)
        server = orm_spawner.server if orm_spawner is not None else None
        if server is None:
            # State of a server that is not running (e.g. the hub died while it started): give back what it held.
            self._board = {}
            if self._holds(board):
                self.log.warning("%s: SpiNNaker state of a server that is not running: releasing it",
                                 self._log_name)
                try:
                    asyncio.get_running_loop()
                    asyncio.ensure_future(self._release_record(board, None, "user server no longer running"))
                except RuntimeError:
                    self._unreleased = (board, None)  # released at the next start
        elif board.get("mode") == "machine" and board.get("held"):
            if not board_lock(board["board"]).try_take(self._who):
                self.log.error("%s: the lab board %s is recorded as held by two servers", self._log_name,
                               board["board"])

    def clear_state(self):
        super().clear_state()
        # LocalProcessSpawner.poll() clears the state as soon as it finds the process gone, before the hub runs the
        # post-stop hook: keep what is still held for that hook to give back.
        if self._holds(self._board) or self._claim_task is not None:
            self._unreleased = (self._board, self._allocation)
        self._board, self._board_cfg, self._allocation = {}, None, None

    @staticmethod
    def _holds(board: dict) -> bool:
        return bool((board.get("job_url") and not board.get("released") and not board.get("lost"))
                    or (board.get("mode") == "machine" and board.get("held")))

    def _save_state(self) -> None:
        """Write the state to the hub's database now (e.g. a job lost while the server runs)."""
        try:
            orm_spawner = self.orm_spawner
            if orm_spawner is None or orm_spawner.server is None:
                return
            from sqlalchemy import inspect as sa_inspect

            orm_spawner.state = self.get_state()
            sa_inspect(orm_spawner).session.commit()
        except Exception:  # noqa: BLE001 - the state is saved again at the next stop
            self.log.exception("%s: could not save the SpiNNaker state", self._log_name)

    # -- environment -------------------------------------------------------------------------------------------
    def get_env(self):
        env = super().get_env()
        mode = self.board_mode
        board = self._board
        env["SPINNAKER_MODE"] = board.get("mode", mode)
        env["SPINNAKER_MACHINE_CFG"] = self._board_cfg or self._deployment_cfg()
        if board.get("board") and not board.get("fallback"):
            env["SPINNAKER_BOARD"] = str(board["board"])
        if board.get("job_id") is not None:
            env["SPINNAKER_BOARD_JOB"] = str(board["job_id"])
            env["SPINNAKER_BOARD_JOB_URL"] = str(board["job_url"])
        if board.get("notice"):
            env["SPINNAKER_BOARD_NOTICE"] = board["notice"]
        if mode == "per-run":
            for key, value in self.service_env.items():
                env.setdefault(key, str(value))
        if self.path_append:
            env["PATH"] = os.pathsep.join([env.get("PATH") or os.defpath, *self.path_append])
        return env

    # -- session mode: spalloc -------------------------------------------------------------------------------
    async def _claim_session(self) -> None:
        sp = self.spinnaker
        n = self.boards_wanted()
        boards = "a SpiNNaker board" if n == 1 else f"{n} SpiNNaker boards"
        self._say(5, f"Claiming {boards} for your session from the SpiNNaker allocation service")
        self._board = {"mode": "session", "boards": n, "state": "REQUESTED"}
        last: dict[str, Any] = {}

        def progress(p: ClaimProgress) -> None:
            last.update(state=p.state, job=p.job_id)
            self._board.update(job_url=p.job_url, job_id=p.job_id, state=p.state.value)
            self._say(None, p.message)

        failed = None
        allocation = None
        try:
            # Recorded durably before the service is asked, the job's URL the moment it answers (leases.py).
            self._claim_task = asyncio.ensure_future(leases.claim_recorded(
                self.allocator(), self.leases(), self.user.name, holder=self._holder, n_boards=n,
                collab=sp["spalloc"]["collab"], progress=progress, on_lost=self._on_lost,
                timeout=float(sp["claim_timeout"])))
            allocation = await self._claim_task
        except SpallocTimeoutError:
            job = f"job {last['job']} was still {last['state'].value.lower()}" if last else "no answer yet"
            failed = f"no SpiNNaker board became free within {_words(sp['claim_timeout'])} ({job})"
        except SpallocError as e:
            self.log.error("%s: claiming boards failed: %s", self._log_name, e)
            failed = str(e).rstrip(".")
        except leases.LeaseStoreError as e:
            self.log.error("%s: %s", self._log_name, e)
            failed = f"the hub could not record its SpiNNaker job ({e})"
        finally:
            self._claim_task = None
        if failed is not None:
            self._board["released"] = True  # a claim that fails destroys its own job
            return self._no_board(failed)
        if self._boards_stopping:  # stopped while waiting (e.g. start timeout): the claim came too late
            await allocation.release("user server stopped before its boards were ready")
            self._forget_lease(allocation.job_url)
            raise asyncio.CancelledError()
        self._allocation = allocation
        self._board = {"mode": "session", "boards": allocation.machine.n_boards, "board": allocation.root_host,
                       "version": allocation.version, "job_id": allocation.job_id, "job_url": allocation.job_url,
                       "state": JobState.READY.value, "claimed_at": _now_iso()}
        claimed = ClaimedBoards(allocation.root_host, allocation.version, allocation.job_url, self.user.name, n)
        self._board_cfg = spynnaker_cfg_text(self.spinnaker, claimed=claimed)

    def _no_board(self, reason: str) -> None:
        sp = self.spinnaker
        if sp["on_timeout"] == "fail":
            raise NoBoardError(f"No SpiNNaker board for your server: {reason}. This service starts servers only "
                               f"with a board; try again later.")
        notice = (f"No SpiNNaker board for this session: {reason}. It runs in virtual mode: run() maps and loads "
                  f"your network but recorded data come back empty. Restart your server later to try again for a "
                  f"board.")
        self._say(None, notice)
        self._board = {"mode": self.board_mode, "fallback": "virtual", "notice": notice, "since": _now_iso()}
        self._board_cfg = self._deployment_cfg("virtual")

    def _forget_lease(self, url: Optional[str]) -> None:
        store = self.leases()
        if store is not None and url:
            try:
                store.forget(job_url=url)
            except Exception:  # noqa: BLE001 - the next hub start finds the job ended and drops the row
                self.log.exception("%s: could not update the board lease store", self._log_name)

    async def _on_lost(self, reason: str) -> None:
        if self._boards_stopping or not self._board.get("job_url"):
            return
        self._forget_lease(self._board.get("job_url"))
        self._board.update(lost=reason, lost_at=_now_iso(), state=JobState.DESTROYED.value)
        self._allocation = None
        self.log.warning("%s: the SpiNNaker allocation service ended job %s: %s. The server keeps running "
                         "without its board until it is restarted.", self._log_name, self._board.get("job_id"),
                         reason)
        self._save_state()

    def _needs_resume(self) -> bool:
        b = self._board
        return bool(b.get("mode") == "session" and b.get("job_url") and not b.get("lost") and not b.get("released")
                    and self._allocation is None and not self._boards_stopping and not self._boards_in_start
                    and not getattr(self, "_spawn_pending", False) and not getattr(self, "_stop_pending", False)
                    and (self._resume_task is None or self._resume_task.done()))

    async def _resume(self) -> None:
        """Take over the keepalive of the job of a server that outlived a hub restart."""
        url = self._board["job_url"]
        try:
            allocation = await self.allocator().resume(url, on_lost=self._on_lost, timeout=60)
        except SpallocJobDestroyedError as e:
            await self._on_lost(f"{e.reason or 'ended'} (while the hub was not keeping it alive)")
            return
        except SpallocRequestError as e:
            if e.status in (404, 410):
                await self._on_lost("the allocation service no longer knows this job")
            else:
                self.log.warning("%s: cannot resume %s yet (%s); trying again at the next poll",
                                 self._log_name, url, e)
            return
        except SpallocError as e:
            self.log.warning("%s: cannot resume %s yet (%s); trying again at the next poll", self._log_name, url, e)
            return
        if self._boards_stopping or self._board.get("job_url") != url:
            await allocation.job.stop_keepalive()
            return
        self._allocation = allocation
        store = self.leases()
        if store is not None:
            store.adopt(url, self._holder, self.user.name, allocation.job.client.service_url)
        self.log.info("%s: resumed the keepalive of SpiNNaker job %s (board %s)", self._log_name,
                      allocation.job_id, allocation.root_host)

    # -- machine mode: the lab's board ---------------------------------------------------------------------------
    async def _claim_machine(self) -> None:
        sp = self.spinnaker
        name = sp["machine_name"]
        lock = board_lock(name)
        if not lock.try_take(self._who):
            if not await lock.take(self._who, float(sp["claim_timeout"]), lambda m: self._say(None, m)):
                holder = lock.holder_words(self.user.name)
                waited = f" within {_words(sp['claim_timeout'])}" if sp["claim_timeout"] else ""
                return self._no_board(f"the lab's board {name} did not become free{waited}: it is in use by "
                                      f"{holder}, and is free again when that server stops")
        if self._boards_stopping:
            lock.release(self._who)
            raise asyncio.CancelledError()
        self._say(5, f"The lab's SpiNNaker board {name} is yours until your server stops")
        self._board = {"mode": "machine", "board": name, "version": sp["version"], "held": True,
                       "claimed_at": _now_iso()}
        self._board_cfg = self._deployment_cfg("machine")

    # -- release -----------------------------------------------------------------------------------------------
    async def _release_boards(self, reason: str) -> None:
        """Give back whatever this server holds (idempotent): a claim in progress, a spalloc job, the lab board."""
        self._boards_stopping = True
        board, allocation = self._board, self._allocation
        if not self._holds(board) and self._unreleased is not None:
            board, allocation = self._unreleased
        self._unreleased = None
        claim = self._claim_task
        for task in (claim, self._resume_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - cancelled on purpose
                    pass
                if task is claim:
                    board["released"] = True  # a cancelled claim destroys its own job
        await self._release_record(board, allocation, reason)
        self._allocation = None

    async def _release_record(self, board: dict, allocation, reason: str) -> None:
        """Give back what one state record holds: the lab board, a spalloc job (marks the record released)."""
        if board.get("mode") == "machine" and board.get("held"):
            board_lock(board["board"]).release(self._who)
            board["held"] = False
            self.log.info("%s: released the lab board %s (%s)", self._log_name, board["board"], reason)
        url = board.get("job_url")
        if url and not board.get("released") and not board.get("lost"):
            board["released"] = True  # (before the request: a second release meanwhile sends nothing)
            try:
                if allocation is not None:
                    await allocation.release(reason)
                else:
                    await self.allocator().release(url, reason)
                self.log.info("%s: released SpiNNaker job %s (%s)", self._log_name, board.get("job_id"), reason)
                self._forget_lease(url)  # (kept when the release failed: the next hub start retries it)
            except SpallocError as e:
                self.log.warning("%s: could not release SpiNNaker job %s (%s); the service ends it after its "
                                 "keepalive interval", self._log_name, url, e)

    # -- status --------------------------------------------------------------------------------------------------
    async def board_status(self, live: bool = True) -> dict:
        """What this server holds, for the user and admins; `live`: ask the service for the job's state now."""
        b = copy.deepcopy(self._board)
        out: dict[str, Any] = {"user": self.user.name, "server": self.name or "", "configured_mode": self.board_mode,
                               "running": bool(self.active and not self.pending), "pending": self.pending}
        out.update(b)
        out.setdefault("mode", self.board_mode)
        if b.get("job_url"):
            out["keepalive"] = ("running" if self._allocation is not None and self._allocation.job.keepalive_running
                                else "resuming" if self._resume_task is not None and not self._resume_task.done()
                                else "stopped")
        if live and b.get("job_url") and not b.get("released"):
            try:
                status = await asyncio.wait_for(self.allocator().client().job(b["job_url"]).status(), 10)
                out["live"] = {"state": status.state.value, "reason": status.reason, "owner": status.owner,
                               "keepalive_host": status.keepalive_host, "checked_at": _now_iso()}
            except Exception as e:  # noqa: BLE001 - said to the asker, never raised
                out["live_error"] = str(e) or type(e).__name__
        if b.get("mode") == "machine":
            lock = board_lock(b.get("board") or self.spinnaker["machine_name"])
            out["holder"] = "/".join(lock.holder) if lock.holder else None
        return out

