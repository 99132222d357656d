"""`BoardsMixin`: a JupyterHub spawner's side of SpiNNaker boards, a thin adapter around `session.BoardSession`.

It maps JupyterHub's spawner life (start, poll, stop, the post-stop hook, get/load/clear_state) onto the session's
(claim, started, resume, release), turns the session's record into spawner state and the server's environment, its
messages into spawn-page progress, and `NoBoard` into a `SpawnException`. The package docstring says what each mode
does.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from jupyterhub.spawner import SpawnException
from traitlets import Dict, List, Unicode
from traitlets.config import LoggingConfigurable

from ..spalloc import SpallocAllocator
from ..upstream import log_name, save_spawner_state
from .record import STATE_KEY, BoardRecord
from .session import BoardSession, NoBoard


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

    _allocator: SpallocAllocator | None = None  # one per hub process, shared by all spawners

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session: BoardSession | None = None  # this server's boards (None: nothing recorded)
        self._unreleased: BoardSession | None = None  # cleared from the state while it still held something
        self._background: set[asyncio.Future] = set()  # releases started from load_state (kept until done)
        self._boards_in_start = False
        self._stop_called = False

    # -- configuration ---------------------------------------------------------------------------------------
    @property
    def spinnaker(self) -> dict:
        from ..config import merge
        from ..schema import SCHEMA, defaults

        return merge(defaults(SCHEMA["properties"]["spinnaker"]), self.spinnaker_config or {})

    @property
    def board_mode(self) -> str:
        return self.spinnaker["mode"]

    def allocator(self) -> SpallocAllocator:
        cls = BoardsMixin
        if cls._allocator is None:
            cls._allocator = SpallocAllocator(config=self.config, log=self.log)
        return cls._allocator

    def boards_wanted(self) -> int:
        sp = self.spinnaker["spalloc"]
        if self.user.name in sp["boards_per_user"]:
            return int(sp["boards_per_user"][self.user.name])
        groups = [g.name for g in getattr(self.user, "groups", []) or []]
        per_group = [int(sp["boards_per_group"][g]) for g in groups if g in sp["boards_per_group"]]
        return max(per_group) if per_group else int(sp["boards"])

    def _new_session(self, record: BoardRecord | None = None) -> BoardSession:
        return BoardSession(
            self.spinnaker,
            owner=self.user.name,
            name=self.name or "",
            allocator=self.allocator(),
            lease_store=self.lease_store or None,
            record=record,
            say=self._say,
            on_change=self._save_state,
            log=self.log,
            label=log_name(self),
        )

    # -- progress ----------------------------------------------------------------------------------------------
    def progress_reset(self) -> None:
        # The spawner's own start() resets its progress; keep the board messages said before it on the page.
        if self._boards_in_start:
            return
        parent = getattr(super(), "progress_reset", None)
        if parent:
            parent()

    def _say(self, percent: int | None, message: str) -> None:
        say = getattr(self, "progress_say", None)
        if say:
            say(percent, message)
        else:
            self.log.info("[%s] %s", self.user.name, message)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self):
        if self._unreleased is not None:  # (the hub never ran the post-stop hook of the last server)
            old, self._unreleased = self._unreleased, None
            await old.release("user server no longer running")
        self.progress_reset()
        session = self._session = self._new_session()
        self._stop_called = False
        try:
            await session.claim(self.boards_wanted() if session.mode == "session" else 1)
        except NoBoard as e:
            raise NoBoardError(str(e)) from None
        self._boards_in_start = True
        try:
            started = await super().start()
            session.started()
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
            self._session.resume_soon()
        return status

    def _needs_resume(self) -> bool:
        """A running server's job that this hub process does not keep alive yet (it outlived a hub restart)."""
        return self._session is not None and self._session.needs_resume() and not self._start_or_stop_under_way()

    def _start_or_stop_under_way(self) -> bool:
        # (JupyterHub's start and stop paths deal with the boards themselves; `pending` is its public reading)
        return self._boards_in_start or self.pending in ("spawn", "stop")

    async def _release_boards(self, reason: str) -> None:
        """Give back whatever this server holds (idempotent): a claim in progress, a spalloc job, the lab board,
        and what a cleared state still held."""
        sessions = [s for s in (self._unreleased, self._session) if s is not None]
        self._unreleased = None
        for session in sessions:
            await session.release(reason)

    # -- state -------------------------------------------------------------------------------------------------
    def get_state(self):
        state = super().get_state()
        record = self._session.record if self._session is not None else None
        if record is not None:
            state[STATE_KEY] = record.to_dict()
        return state

    def load_state(self, state):
        super().load_state(state)
        record = BoardRecord.from_dict((state or {}).get(STATE_KEY))
        if record is None:
            self._session = None
            return
        session = self._new_session(record)
        orm_spawner = getattr(self, "orm_spawner", None)
        if orm_spawner is not None and orm_spawner.server is not None:
            self._session = session
            session.retake_lab_board()
            return
        # State of a server that is not running (e.g. the hub died while it started): give back what it held.
        self._session = None
        if record.holds:
            self.log.warning("%s: SpiNNaker state of a server that is not running: releasing it", log_name(self))
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                self._unreleased = session  # released at the next start
                return
            task = asyncio.ensure_future(session.release("user server no longer running"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def clear_state(self):
        super().clear_state()
        # LocalProcessSpawner.poll() clears the state as soon as it finds the process gone, before the hub runs the
        # post-stop hook: keep what is still held for that hook to give back.
        if self._session is not None and self._session.holds:
            self._unreleased = self._session
        self._session = None

    def _save_state(self) -> None:
        """Write the state to the hub's database now (e.g. a job lost while the server runs)."""
        try:
            save_spawner_state(self)  # from inside the spawner: upstream.py says why and how
        except Exception:  # noqa: BLE001 - the state is saved again at the next stop
            self.log.exception("%s: could not save the SpiNNaker state", log_name(self))

    # -- environment and status ----------------------------------------------------------------------------------
    def get_env(self):
        env = super().get_env()
        env.update((self._session or self._new_session()).env())
        if self.board_mode == "per-run":
            for key, value in self.service_env.items():
                env.setdefault(key, str(value))
        if self.path_append:
            env["PATH"] = os.pathsep.join([env.get("PATH") or os.defpath, *self.path_append])
        return env

    async def board_status(self, live: bool = True) -> dict:
        """What this server holds, for the user and admins; `live`: ask the service for the job's state now."""
        out: dict[str, Any] = {
            "user": self.user.name,
            "server": self.name or "",
            "configured_mode": self.board_mode,
            "running": bool(self.active and not self.pending),
            "pending": self.pending,
        }
        out.update(await (self._session or self._new_session()).status(live=live))
        return out


__all__ = ["BoardsMixin", "NoBoardError", "STATE_KEY"]
