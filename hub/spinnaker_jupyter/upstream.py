"""Every private or deprecated upstream API the hub package relies on, in one place.

The project configures JupyterHub, oauthenticator, DockerSpawner, JupyterLab, jupyter_server and jupyter-server-proxy
rather than forking them; where a decision needs something they do not offer publicly, it is reached for here and
nowhere else. Each function names the pinned version it was checked against (requirements-hub.txt,
hub/pyproject.toml) and why no public API does, and tests/unit/test_upstream.py checks each against the installed
packages (signatures, attributes, the database cascade): an upgrade that changes one fails there by name instead of
somewhere in a running hub.

Imports stay inside the functions: user servers import this module at start-up (singleuser.py), and must not pay
for JupyterHub's imports. The user-server extension has its own fence (spinnaker_jupyter_ext/proxy_upstream.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any

#: The versions every function here was checked against (the pins).
JUPYTERHUB = "6.1.1"
OAUTHENTICATOR = "17.4.0"
JUPYTERLAB = "4.6.6"
TORNADO = "6.6.1"  # not pinned itself: the version JupyterHub 6.1.1 and jupyter_server 2.21.1 bring
JUPYTER_SERVER = "2.21.1"
JUPYTER_SERVER_PROXY = "4.6.0"
PYTHON = "3.11"  # the interpreter of the hub's environment (.venv), whose standard library cache_platform relies on


# ------------------------------------------------------------------------------------------------ JupyterHub 6.1.1
def log_name(spawner) -> str:
    """How JupyterHub's own log lines name a server (``user`` or ``user:server``): the text of its private
    ``Spawner._log_name``, made from public attributes, so that our lines and the hub's name a server alike."""
    user = spawner.user.name if spawner.user else "(no user)"
    return f"{user}:{spawner.name}" if spawner.name else user


def start_error(spawner) -> BaseException | None:
    """Why the last start of this server failed, while it is not running again (None: it did not fail).

    JupyterHub 6.1.1 keeps it only in the private ``Spawner._spawn_future`` (its own ``_failed`` reads it too); the
    REST API says nothing of a failed start. Used by the course endpoints, which report each student's start."""
    future = spawner._spawn_future
    if future is not None and future.done() and not future.cancelled() and future.exception():
        return future.exception()
    return None


def save_spawner_state(spawner) -> bool:
    """Write ``spawner.get_state()`` into the hub's database now, from inside the spawner (False: the server is not
    running, nothing written).

    JupyterHub 6.1.1 saves a spawner's state itself only after a start, a stop or a poll that finds it gone, and
    ``Spawner.db`` is deprecated since 6.1. A change in between (a SpiNNaker job lost while the server runs) would
    be lost by a hub crash: the ORM spawner (public ``Spawner.orm_spawner``) is committed through the database
    session it belongs to (SQLAlchemy's public ``inspect``), which is the hub's own."""
    from sqlalchemy import inspect

    orm_spawner = spawner.orm_spawner
    if orm_spawner is None or orm_spawner.server is None:
        return False
    orm_spawner.state = spawner.get_state()
    inspect(orm_spawner).session.commit()
    return True


def add_hub_handlers(c, handlers: list) -> None:
    """Tornado handlers served by the hub itself (``/hub/api/spinnaker/...``), through ``JupyterHub.extra_handlers``.

    Deprecated since JupyterHub 3.1 in favour of services, and still working in 6.1.1 (a warning at start-up): the
    board and course endpoints need the hub's own user and spawner objects (a server's live board state, starting
    servers through the hub's spawn path with its start queue), which a service cannot reach."""
    c.JupyterHub.extra_handlers.extend(handlers)


def managed_service_processes(app) -> list:
    """The processes of the hub-managed services the hub has started (``Popen``-like, with ``poll``/``terminate``).

    JupyterHub 6.1.1 keeps them in the private ``JupyterHub._service_map`` (name -> Service; ``Service.proc``) and
    ends them only in its own cleanup, which a hub that fails during start-up never reaches."""
    return [
        service.proc
        for service in getattr(app, "_service_map", {}).values()
        if service.managed and getattr(service, "proc", None) is not None
    ]


def handle_sigterm_until_running(handler) -> None:
    """Handle SIGTERM with ``handler`` (a ``signal.signal`` handler) until the hub installs its own.

    JupyterHub 6.1.1 installs its SIGTERM and SIGINT handlers (``JupyterHub.init_signal``: asyncio loop handlers,
    which replace this one) only as the last step of ``JupyterHub.start``, after "JupyterHub is now running"; its API
    answers, and its proxy and managed services run, well before. Until then SIGTERM has its default action: the hub
    ends at once, without its clean-up or any ``atexit`` callback, and leaves them running in their own sessions."""
    import signal

    signal.signal(signal.SIGTERM, handler)


#: Seconds a stopping hub waits for the tasks it cancelled before it stops anyway (bound_the_shutdown).
SHUTDOWN_GRACE = 15.0


def bound_the_shutdown(grace: float = SHUTDOWN_GRACE) -> None:
    """A stopping hub ends within ``grace`` seconds of its clean-up, however its tasks take their cancel.

    JupyterHub 6.1.1's ``JupyterHub.shutdown_cancel_tasks`` (SIGTERM, SIGINT) runs ``cleanup()``, cancels every
    other task and then waits for all of them without a limit: one that ignores its cancel keeps a stopped hub
    running (its proxy already gone) until systemd kills it at TimeoutStopSec, and the restart waits for that. Seen
    once in CI, the hub silent for 63 s after "...done". No setting bounds that wait; here ``cleanup`` arms a timer
    that, should the loop still run ``grace`` seconds after it, logs each task still running with its stack (what
    ignored the cancel) and stops the loop, which ends the hub as the wait's end would have."""
    import asyncio
    import io

    from jupyterhub.app import JupyterHub

    def give_up(app, loop) -> None:
        stuck = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in stuck:
            stack = io.StringIO()
            task.print_stack(limit=12, file=stack)
            app.log.warning("Still running %g s after its cancel: %s", grace, stack.getvalue().rstrip())
        app.log.error("Stopping now: %d task(s) did not end within %g s of the hub's stop", len(stuck), grace)
        loop.stop()

    def bounded(cleanup):
        async def bounded_cleanup(self):
            await cleanup(self)
            loop = asyncio.get_running_loop()
            loop.call_later(grace, give_up, self, loop)  # (gone with the loop when the shutdown ends in time)

        return bounded_cleanup

    _patch_once(JupyterHub, "cleanup", bounded)


#: Seconds between the hub's checks that each of its managed services (the job service, the culler) still runs.
SERVICE_POLL = 5


def watch_services_every(seconds: int = SERVICE_POLL) -> None:
    """A hub-managed service that dies is started again within ``seconds``, not JupyterHub's 30.

    JupyterHub 6.1.1's ``Service.start`` makes its ``_ServiceSpawner`` without the hub's config (so
    ``c.Spawner.poll_interval`` does not reach it) and polls it every 30 s (the trait's default); a dead job service
    left nmpi clients with "connection refused" and its running jobs' boards to their keepalive for up to that long.
    Here each start is followed by polling every ``seconds`` (``start_polling`` replaces the callback it made; the
    restart callback JupyterHub added stays)."""
    from jupyterhub.services.service import Service

    def watched(start):
        async def start_watched(self):
            await start(self)
            spawner = getattr(self, "spawner", None)
            if spawner is not None and spawner.poll_interval > seconds:
                spawner.poll_interval = seconds
                spawner.start_polling()

        return start_watched

    _patch_once(Service, "start", watched)


def _patch_once(owner, name: str, wrap) -> None:
    """Replace ``owner.name`` with ``wrap(original)``, once (a config read twice does not wrap it twice); the
    original stays reachable as the replacement's ``__wrapped__``."""
    original = getattr(owner, name)
    if getattr(original, "_spinnaker_patched", False):
        return
    patched = wrap(original)
    patched._spinnaker_patched = True
    patched.__wrapped__ = original
    setattr(owner, name, patched)


def remove_proxy_files(proxy) -> None:
    """Remove what ``ConfigurableHTTPProxy`` leaves of a proxy it started (its pid file, its unix sockets): its
    private ``_remove_process_files``, the part of its public ``stop()`` that is wanted after our own stop (which,
    unlike ``stop()``, waits for the proxy to exit and kills it if it does not)."""
    proxy._remove_process_files()


def delete_hub_user(db_url: str, name: str) -> list[int] | None:
    """Delete a hub user in JupyterHub's database while the hub is down; returns the process ids its spawners'
    states recorded (servers a stopped hub left running), or None when there is no such user.

    JupyterHub's REST API is the way while the hub runs (account_removal.py); with the hub down there is only its
    database. Its ORM (``jupyterhub.orm``, 6.1.1) deletes a User with its API tokens, OAuth codes and spawners
    (database cascades), which is what revokes every token and login cookie of the user."""
    from jupyterhub import orm

    db = orm.new_session_factory(db_url)()
    try:
        user = db.query(orm.User).filter_by(name=name).first()
        if user is None:
            return None
        pids = [s.state.get("pid") for s in user.orm_spawners.values() if s.state and s.state.get("pid")]
        db.delete(user)
        db.commit()
        return pids
    finally:
        db.close()


def spawner_states(db_url: str) -> list[tuple[str, str, dict, bool, Any]]:
    """(user, server name, spawner state, running, started) of every spawner in JupyterHub's database, by user and
    server name, read while the hub is down (`spinnaker-jupyter boards`; boards/admin.py asks the running hub's REST
    API first). Through JupyterHub's ORM models (``jupyterhub.orm``, 6.1.1: ``Spawner.state`` a JSON dict,
    ``Spawner.server`` set while the server runs), not ``orm.new_session_factory``: that creates the tables of a
    missing database, and a read must write nothing. A missing or unreadable database raises
    ``sqlalchemy.exc.OperationalError``."""
    import warnings

    import sqlalchemy as sa
    from jupyterhub import orm
    from sqlalchemy.orm import Session

    engine = sa.create_engine(db_url)
    try:
        with Session(engine) as db, warnings.catch_warnings():  # (the columns only: no eager loads of other tables)
            # (6.1.1's JSONDict type lacks SQLAlchemy's cache_ok: a warning an operator's command should not print)
            warnings.filterwarnings("ignore", "TypeDecorator JSONDict", sa.exc.SAWarning)
            S = orm.Spawner
            rows = db.execute(
                sa.select(orm.User.name, S.name, S.state, S.server_id, S.started)
                .join(S.user)
                .order_by(orm.User.name, S.name)
            )
            return [
                (user, name or "", state or {}, server_id is not None, started)
                for user, name, state, server_id, started in rows
            ]
    finally:
        engine.dispose()


def users_with_servers(authenticator) -> list:
    """The hub's users (``jupyterhub.user.User``) with a server running or starting, from inside the hub.

    JupyterHub 6.1.1 makes the authenticator with the app as its traitlets ``parent``; the app's ``users`` (a
    ``UserDict`` of the users in memory, which holds every owner of a running server from start-up on) has no public
    accessor. Used by the periodic collab membership check (ebrains.py)."""
    users = getattr(authenticator.parent, "users", None)
    return [user for user in list(users.values()) if user.active] if users is not None else []


async def stop_server(authenticator, user, server_name: str = "") -> None:
    """Stop one of a user's servers from inside the hub, as JupyterHub 6.1.1's REST API does it
    (``BaseHandler.stop_single_user``: its route off the proxy, then ``User.stop``); no public API stops a server
    without a request handler. A server already starting or stopping is left to that."""
    spawner = user.spawners.get(server_name)
    if spawner is None or spawner.pending or not spawner.active:
        return
    await authenticator.parent.proxy.delete_user(user, server_name)
    await user.stop(server_name)


# -------------------------------------------------------------------------------------------- oauthenticator 17.4.0
def token_to_auth_model(authenticator, token_info: Mapping[str, Any]) -> Awaitable[dict]:
    """The auth model a login with ``token_info`` would give (userinfo with its access token), as a coroutine.

    oauthenticator's private ``OAuthenticator._token_to_auth_model(token_info)``: the access-token service checks a
    refreshed token exactly as a login checks a new one (userinfo, claims, groups), and oauthenticator offers no
    public call for that (``authenticate`` starts from an authorization code)."""
    return authenticator._token_to_auth_model(token_info)


# ---------------------------------------------------------------------------------------------- JupyterLab 4.6.6
def skip_yarn_config() -> None:
    """Make JupyterLab's private ``jupyterlab.commands._yarn_config`` answer what it answers when Node is absent (no
    yarn or npm settings) instead of running ``node yarn.js config --json`` at every user-server start (about 0.5
    CPU-seconds; only `jupyter lab build` and extension installs use the registry, and user servers do neither:
    singleuser.py says more)."""
    import jupyterlab.commands

    jupyterlab.commands._yarn_config = no_yarn_config


def no_yarn_config(logger=None) -> dict:
    """jupyterlab.commands._yarn_config's answer when Node is not installed."""
    return {"yarn config": {}, "npm config": {}}


# ------------------------------------------------------------------------------------------ jupyter_server 2.21.1
def skip_git_probe() -> None:
    """Make jupyter_server's private ``jupyter_server._sysinfo.pkg_commit_hash`` answer what it answers outside any
    git repository ("not from a repository") without looking. At every start (``ServerApp.init_webapp``, through
    ``_sysinfo.get_sys_info``) it looks for a .git folder above jupyter_server's package, finds the project's (the venv
    lives in its checkout) and runs `git rev-parse` to name jupyter_server's commit, which that is not; for every user
    account git refuses the hub account's repository anyway (dubious ownership), giving that same answer: ~0.005
    CPU-s of a forked start spent for nothing. Static files keep their version in their URLs as for any installed
    jupyter_server. Called by singleuser.prepare()."""
    from jupyter_server import _sysinfo

    _sysinfo.pkg_commit_hash = no_commit_hash


def no_commit_hash(pkg_path) -> tuple[str, str]:
    """jupyter_server._sysinfo.pkg_commit_hash's answer for a folder outside any git repository."""
    return "", ""


def cache_platform() -> None:
    """Find the machine's ``platform.platform()`` now, in the fork server before it forks any server: Python 3.11
    keeps the answer (its private ``platform._platform_cache``), and jupyter_server's private
    ``_sysinfo.pkg_info`` asks for it at every server start (``ServerApp.init_webapp``); finding it runs `uname -p`
    in a process and reads the C library's version from the interpreter's binary. It is the machine's, not a
    user's."""
    import platform

    platform.platform()


# ------------------------------------------------------------------------------------- jupyter-server-proxy 4.6.0
#: The entry-point group of jupyter-server-proxy's named servers.
SERVER_PROXY_GROUP = "jupyter_serverproxy_servers"


def snapshot_server_proxy_entry_points() -> None:
    """Answer jupyter-server-proxy's reading of its named servers (here batch-jobs and nrp) from one reading of the
    installed packages' entry points made now, in the fork server before it forks any server: at each server start
    ``jupyter_server_proxy.config.get_entrypoint_server_processes`` calls ``entry_points(group=SERVER_PROXY_GROUP)``,
    the name its module imported from importlib.metadata, which reads every installed package's entry points (~290
    entry_points.txt files, ~5 ms CPU); jupyter-server-proxy offers no setting for it. That module's ``entry_points``
    is replaced by one that answers that question from the reading and asks importlib any other. A package
    installed into the hub's environment later is seen after the hub's restart, as its code is."""
    from importlib.metadata import entry_points

    from jupyter_server_proxy import config

    found = entry_points(group=SERVER_PROXY_GROUP)

    def answer(**params):
        return found if params == {"group": SERVER_PROXY_GROUP} else entry_points(**params)

    config.entry_points = answer


# -------------------------------------------------------------------------------------------------- tornado 6.6.1
def status_reason(handler) -> str:
    """The reason phrase of the response's status ("Not Found", or an HTTPError's own `reason`), for a JSON or HTML
    error body written in `write_error`: tornado passes that method only the status code, and keeps the phrase it
    chose (in `send_error` / `set_status`) in the private `RequestHandler._reason`."""
    return handler._reason
