"""`BoardsMixin`: a JupyterHub spawner's side of SpiNNaker boards, a thin adapter around `session.BoardSession`.

It maps JupyterHub's spawner life (start, poll, stop, the post-stop hook, get/load/clear_state) onto the session's
(claim, started, resume, release), turns the session's record into spawner state and the server's environment, its
messages into spawn-page progress, and `NoBoard` into a `SpawnException`. The package docstring says what each mode
does.
"""

from __future__ import annotations

import asyncio
import copy
import os
from typing import Any

from jupyterhub.spawner import SpawnException
from traitlets import Bool, Dict, Enum, Integer, List, Unicode
from traitlets.config import LoggingConfigurable

from ..schema import SCHEMA
from ..spalloc import SpallocAllocator
from ..upstream import log_name, save_spawner_state
from .record import STATE_KEY, BoardRecord
from .session import BoardSession, NoBoard
from .share import boards_share


class NoBoardError(SpawnException):
    """A start refused because no board came (spinnaker.on_timeout: fail); the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="spinnaker_no_board", status_code=503)
        self.jupyterhub_message = message  # what the spawn page says


#: Each board trait of `BoardsMixin` and the key of the deployment's `spinnaker:` section it holds: the one place
#: that maps the section onto the traits (`section_traits`, used by `hubconfig.configure_hub`) and back into the
#: settings a `BoardSession` takes (`BoardsMixin.spinnaker`). The job runner gives its sessions the section itself.
#: (spalloc's url, keepalive_interval, tags, ca_certs and token are `SpallocAllocator`'s traits.)
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "board_mode": ("mode",),
    "board_version": ("version",),
    "machine_name": ("machine_name",),
    "claim_timeout": ("claim_timeout",),
    "on_timeout": ("on_timeout",),
    "extra_cfg": ("extra_cfg",),
    "spalloc_url": ("spalloc", "url"),
    "spalloc_boards": ("spalloc", "boards"),
    "spalloc_boards_per_group": ("spalloc", "boards_per_group"),
    "spalloc_boards_per_user": ("spalloc", "boards_per_user"),
    "spalloc_group": ("spalloc", "group"),
    "spalloc_collab": ("spalloc", "collab"),
    "spalloc_machine_name": ("spalloc", "machine_name"),
    "spalloc_use_proxy": ("spalloc", "use_proxy"),
}


def section_traits(section: dict) -> dict[str, Any]:
    """{trait name: value} of a validated `spinnaker:` section (copies: the traits never share the section's dicts)."""
    out = {}
    for trait, path in SECTION_KEYS.items():
        value = section
        for key in path:
            value = value[key]
        out[trait] = copy.deepcopy(value)
    return out


def _key(trait: str) -> dict:
    """The schema of the section key a trait holds: its default and its prose are the trait's."""
    node = SCHEMA["properties"]["spinnaker"]
    for key in SECTION_KEYS[trait]:
        node = node["properties"][key]
    return node


def _help(trait: str) -> str:
    return f"{_key(trait)['description']} (The deployment config's `spinnaker.{'.'.join(SECTION_KEYS[trait])}`.)"


def _default(trait: str) -> Any:
    return copy.deepcopy(_key(trait).get("default"))


class BoardsMixin(LoggingConfigurable):
    """SpiNNaker boards for a Spawner: claim before start, release after stop, state persisted (see module doc).
    Configure with the board traits below (`configure_hub()` sets each from the deployment's `spinnaker:` section;
    an operator's ``c.BoardsMixin.<trait>`` in jupyterhub_config.d is validated by traitlets) and
    ``c.SpallocAllocator.*``."""

    board_mode = Enum(
        ["virtual", "machine", "session", "per-run"], _default("board_mode"), help=_help("board_mode")
    ).tag(config=True)
    board_version = Enum([3, 5, 201, 248], _default("board_version"), help=_help("board_version")).tag(config=True)
    machine_name = Unicode(_default("machine_name"), allow_none=True, help=_help("machine_name")).tag(config=True)
    claim_timeout = Integer(_default("claim_timeout"), min=0, help=_help("claim_timeout")).tag(config=True)
    on_timeout = Enum(["virtual", "fail"], _default("on_timeout"), help=_help("on_timeout")).tag(config=True)
    extra_cfg = Dict(Dict(), default_value=_default("extra_cfg"), help=_help("extra_cfg")).tag(config=True)
    spalloc_url = Unicode(_default("spalloc_url"), allow_none=True, help=_help("spalloc_url")).tag(config=True)
    spalloc_boards = Integer(_default("spalloc_boards"), min=1, help=_help("spalloc_boards")).tag(config=True)
    spalloc_boards_per_group = Dict(
        Integer(min=1), default_value=_default("spalloc_boards_per_group"), help=_help("spalloc_boards_per_group")
    ).tag(config=True)
    spalloc_boards_per_user = Dict(
        Integer(min=1), default_value=_default("spalloc_boards_per_user"), help=_help("spalloc_boards_per_user")
    ).tag(config=True)
    spalloc_group = Unicode(_default("spalloc_group"), allow_none=True, help=_help("spalloc_group")).tag(config=True)
    spalloc_collab = Unicode(_default("spalloc_collab"), allow_none=True, help=_help("spalloc_collab")).tag(config=True)
    spalloc_machine_name = Unicode(
        _default("spalloc_machine_name"), allow_none=True, help=_help("spalloc_machine_name")
    ).tag(config=True)
    spalloc_use_proxy = Bool(_default("spalloc_use_proxy"), help=_help("spalloc_use_proxy")).tag(config=True)
    service_env = Dict(
        help="Environment defaults for `per-run` servers: how spinnman reaches the hub's access-token-service "
        "(JUPYTERHUB_SERVICE_HOST/PORT). Values already in the environment win."
    ).tag(config=True)
    path_append = List(Unicode(), help="Folders appended to the servers' PATH (the `spinnaker-status` command).").tag(
        config=True
    )
    lease_store = Unicode(
        "",
        help="SQLite file recording every spalloc job the hub creates (`leases.LeaseStore`), so a restarted "
        "hub can give back the jobs of claims and servers it lost. Empty: not recorded.",
    ).tag(config=True)

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
        """The board traits shaped as the `spinnaker:` section: the settings this server's `BoardSession` takes."""
        out: dict[str, Any] = {}
        for trait, path in SECTION_KEYS.items():
            *parents, key = path
            node = out
            for parent in parents:
                node = node.setdefault(parent, {})
            node[key] = copy.deepcopy(getattr(self, trait))
        return out

    def allocator(self) -> SpallocAllocator:
        cls = BoardsMixin
        if cls._allocator is None:
            cls._allocator = SpallocAllocator(config=self.config, log=self.log)
        return cls._allocator

    def boards_wanted(self) -> int:
        groups = [g.name for g in getattr(self.user, "groups", []) or []]
        return boards_share(
            self.user.name, groups, self.spalloc_boards_per_user, self.spalloc_boards_per_group, self.spalloc_boards
        )

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
        reason = "user server stopped" if self._stop_called else "user server ended unexpectedly (noticed by the hub)"
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


__all__ = ["SECTION_KEYS", "BoardsMixin", "NoBoardError", "STATE_KEY", "section_traits"]
