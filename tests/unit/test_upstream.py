"""The fence around private and deprecated upstream APIs (hub/spinnaker_jupyter/upstream.py and the extension's
proxy_upstream.py): each is checked against the installed packages, so that an upgrade that changes one fails here,
by name, instead of in a running hub. No hub: JupyterHub's ORM on a SQLite file, tornado objects in-process."""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import logging
import platform
import signal
import sys
from types import SimpleNamespace
from unittest import mock

import jupyterlab.commands
import pytest
import sqlalchemy
from jupyter_server import _sysinfo
from jupyter_server_proxy import config as server_proxy_config
from jupyterhub import orm
from jupyterhub.app import JupyterHub
from jupyterhub.proxy import ConfigurableHTTPProxy
from jupyterhub.services.service import Service
from jupyterhub.spawner import (  # (these imports run ldconfig, JupyterHub's pamela: before the tests)
    LocalProcessSpawner,
    Spawner,
)
from oauthenticator.oauth2 import OAuthenticator
from tornado import httputil, web
from tornado.routing import PathMatches, Rule
from traitlets.config import Config

from spinnaker_jupyter import docker as dockermod
from spinnaker_jupyter import upstream
from spinnaker_jupyter.config import load
from spinnaker_jupyter_ext import proxy_upstream


@pytest.mark.parametrize(
    "package, checked",
    [
        ("jupyterhub", upstream.JUPYTERHUB),
        ("oauthenticator", upstream.OAUTHENTICATOR),
        ("jupyterlab", upstream.JUPYTERLAB),
        ("tornado", upstream.TORNADO),
        ("tornado", proxy_upstream.TORNADO_CHECKED),
        ("jupyter_server", upstream.JUPYTER_SERVER),
        ("jupyter-server-proxy", upstream.JUPYTER_SERVER_PROXY),
    ],
)
def test_installed_versions_are_the_checked_ones(package, checked):
    """A new version needs the checks below read again (and the version here changed): this says so by name."""
    assert importlib.metadata.version(package) == checked, (
        f"{package} {importlib.metadata.version(package)} is installed; upstream.py was checked against {checked}: "
        "check each of its functions for that package, then update the version"
    )


# --- JupyterHub ------------------------------------------------------------------------------------------------
@pytest.fixture
def hub_db(tmp_path):
    """JupyterHub's own database (its ORM, as the hub makes it) with a user alice, a running default server and a
    stopped named one."""
    url = f"sqlite:///{tmp_path}/jupyterhub.sqlite"
    db = orm.new_session_factory(url)()
    alice = orm.User(name="alice")
    db.add(alice)
    db.add(orm.OAuthClient(identifier="jupyterhub"))  # (the hub registers itself at start-up)
    db.commit()
    running = orm.Spawner(user=alice, name="", state={"pid": 4242})
    running.server = orm.Server()
    db.add(running)
    db.add(orm.Spawner(user=alice, name="lab", state={}))
    db.commit()
    yield SimpleNamespace(url=url, db=db, alice=alice)
    db.close()


def _spawner(orm_spawner, cls=None):
    return (cls or Spawner)(user=SimpleNamespace(name=orm_spawner.user.name, url="/user/x/"), orm_spawner=orm_spawner)


def test_log_name_reads_as_jupyterhubs(hub_db):
    for orm_spawner in hub_db.alice.orm_spawners.values():
        spawner = _spawner(orm_spawner)
        assert upstream.log_name(spawner) == spawner._log_name
    assert {upstream.log_name(_spawner(s)) for s in hub_db.alice.orm_spawners.values()} == {"alice", "alice:lab"}


def test_start_error(hub_db):
    spawner = _spawner(hub_db.alice.orm_spawners["lab"])
    assert upstream.start_error(spawner) is None  # never started
    failed = asyncio.new_event_loop()
    try:
        future = failed.create_future()
        future.set_exception(RuntimeError("no board"))
        spawner._spawn_future = future
        assert str(upstream.start_error(spawner)) == "no board"
        assert spawner._failed  # JupyterHub's own reading of the same future agrees
    finally:
        failed.close()


def test_spawner_state_saved_from_inside_the_spawner(hub_db):
    running = _spawner(hub_db.alice.orm_spawners[""], LocalProcessSpawner)
    running.pid = 4243  # a change while the server runs (for us: a SpiNNaker job lost)
    assert upstream.save_spawner_state(running)
    stopped = _spawner(hub_db.alice.orm_spawners["lab"], LocalProcessSpawner)
    stopped.pid = 99
    assert not upstream.save_spawner_state(stopped)  # not running: nothing written
    other = orm.new_session_factory(hub_db.url)()  # what a restarted hub reads
    try:
        states = {s.name: s.state for s in other.query(orm.Spawner)}
    finally:
        other.close()
    assert states == {"": {"pid": 4243}, "lab": {}}


def test_hub_user_deleted_with_its_tokens_while_the_hub_is_down(hub_db):
    hub_db.alice.new_api_token(note="notebook")
    hub_db.db.commit()
    hub_db.db.close()
    assert upstream.delete_hub_user(hub_db.url, "alice") == [4242]
    assert upstream.delete_hub_user(hub_db.url, "alice") is None
    db = orm.new_session_factory(hub_db.url)()
    try:
        assert db.query(orm.APIToken).count() == 0 and db.query(orm.Spawner).count() == 0
    finally:
        db.close()


def test_spawner_states_read_while_the_hub_is_down(hub_db, tmp_path):
    """What `spinnaker-jupyter boards` lists with the hub down: each spawner's state and whether its server runs."""
    bob = orm.User(name="bob")
    hub_db.db.add(bob)
    hub_db.db.add(orm.Spawner(user=bob, name="", state={"spinnaker": {"mode": "machine", "held": True}}))
    hub_db.db.commit()
    states = upstream.spawner_states(hub_db.url)
    assert [(user, server, state, running) for user, server, state, running, _ in states] == [
        ("alice", "", {"pid": 4242}, True),
        ("alice", "lab", {}, False),
        ("bob", "", {"spinnaker": {"mode": "machine", "held": True}}, False),
    ]
    missing = tmp_path / "never-started.sqlite"
    with pytest.raises(sqlalchemy.exc.OperationalError):
        upstream.spawner_states(f"sqlite:///{missing}")
    assert not missing.exists() or missing.stat().st_size == 0  # nothing written: no tables made


def test_extra_handlers_still_served():
    """Deprecated since JupyterHub 3.1: still a setting whose handlers the hub serves."""
    c = Config()
    upstream.add_hub_handlers(c, [("/api/spinnaker/x", web.RequestHandler)])
    upstream.add_hub_handlers(c, [("/api/spinnaker/y", web.RequestHandler)])
    assert JupyterHub(config=c).extra_handlers == [
        ("/api/spinnaker/x", web.RequestHandler),
        ("/api/spinnaker/y", web.RequestHandler),
    ]
    assert "self.extra_handlers" in inspect.getsource(JupyterHub.init_handlers)


def test_a_stopping_hub_ends_whatever_task_ignores_its_cancel(monkeypatch, caplog):
    """JupyterHub's shutdown waits for every task it cancelled; with the bound, one that ignores its cancel is named
    in the log and the loop stops anyway (without it, this loop would run until the test's own 10 s stop)."""
    source = inspect.getsource(JupyterHub.shutdown_cancel_tasks)
    assert "await self.cleanup()" in source and "await asyncio.wait(tasks)" in source

    async def no_cleanup(self):
        pass

    monkeypatch.setattr(JupyterHub, "cleanup", no_cleanup)
    upstream.bound_the_shutdown(grace=0.2)
    upstream.bound_the_shutdown(grace=0.2)  # (once only: a config read twice does not wrap it twice)
    assert JupyterHub.cleanup.__wrapped__ is no_cleanup
    app = JupyterHub()
    app.log = logging.getLogger("test-shutdown")

    async def stubborn():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    loop = asyncio.new_event_loop()
    try:
        loop.create_task(stubborn(), name="stubborn")
        loop.call_soon(lambda: loop.create_task(app.shutdown_cancel_tasks(signal.SIGTERM)))
        backstop = loop.call_later(10, loop.stop)
        with caplog.at_level(logging.WARNING, logger="test-shutdown"):
            loop.run_forever()
        assert not backstop.cancelled() and loop.time() < backstop.when(), "the shutdown waited for the stubborn task"
        assert "stubborn" in caplog.text and "did not end within 0.2 s" in caplog.text, caplog.text
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.close()


def test_a_dead_service_is_looked_for_every_few_seconds(monkeypatch):
    """JupyterHub starts each managed service's spawner without the hub's config and polls it every 30 s; after
    each start, ours polls every SERVICE_POLL s (the restart callback JupyterHub added is kept)."""
    source = inspect.getsource(Service.start)
    assert "_ServiceSpawner(" in source and "config=" not in source  # (c.Spawner.poll_interval never reaches it)
    assert "self.spawner.add_poll_callback(self._proc_stopped)" in source and "start_polling()" in source
    assert Spawner.class_traits()["poll_interval"].default_value == 30
    assert "self.stop_polling()" in inspect.getsource(Spawner.start_polling)  # (a second call replaces the first)

    class FakeSpawner:
        poll_interval = 30
        start_polling = mock.Mock()

    async def fake_start(self):
        self.spawner = FakeSpawner()

    monkeypatch.setattr(Service, "start", fake_start)
    upstream.watch_services_every(5)
    upstream.watch_services_every(5)  # (once only)
    assert Service.start.__wrapped__ is fake_start
    service = Service(name="jobs", command=["x"])
    asyncio.run(service.start())
    assert service.spawner.poll_interval == 5
    service.spawner.start_polling.assert_called_once_with()


def test_managed_service_processes():
    assert "_service_map" in JupyterHub.class_traits()
    proc = mock.Mock()
    app = SimpleNamespace(
        _service_map={
            "managed": Service(name="managed", command=["x"]),
            "external": Service(name="external", url="http://127.0.0.1:1"),
        }
    )
    app._service_map["managed"].proc = proc
    assert upstream.managed_service_processes(app) == [proc]


def test_sigterm_is_the_hubs_own_only_at_the_end_of_its_start():
    """handle_sigterm_until_running's premise: JupyterHub installs its handlers as start's last step, after "now
    running", and nowhere sooner; they replace ours (so that a running hub cleans up as JupyterHub does)."""
    start = inspect.getsource(JupyterHub.start)
    assert start.index("self.init_signal()") > start.rindex("JupyterHub is now running")
    for earlier in (JupyterHub.initialize, JupyterHub.launch_instance, JupyterHub.launch_instance_async):
        assert "init_signal" not in inspect.getsource(earlier), earlier
    ours, before = mock.Mock(), signal.getsignal(signal.SIGTERM)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        upstream.handle_sigterm_until_running(ours)
        assert signal.getsignal(signal.SIGTERM) is ours
        JupyterHub().init_signal()
        assert signal.getsignal(signal.SIGTERM) not in (ours, signal.SIG_DFL)
    finally:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(s)
        signal.signal(signal.SIGTERM, before)
        asyncio.set_event_loop(None)
        loop.close()


def test_proxy_files_removed(tmp_path):
    pid_file = tmp_path / "jupyterhub-proxy.pid"
    pid_file.write_text("4242")
    upstream.remove_proxy_files(
        ConfigurableHTTPProxy(
            pid_file=str(pid_file), api_url="http://127.0.0.1:8001", public_url="http://127.0.0.1:8000"
        )
    )
    assert not pid_file.exists()


# --- oauthenticator, JupyterLab, DockerSpawner -----------------------------------------------------------------
def test_token_to_auth_model_signature():
    method = OAuthenticator._token_to_auth_model
    assert inspect.iscoroutinefunction(method)
    assert list(inspect.signature(method).parameters) == ["self", "token_info"]


def test_yarn_config_answer_is_jupyterlabs_own_without_node(monkeypatch):
    original = jupyterlab.commands._yarn_config
    assert list(inspect.signature(original).parameters) == ["logger"]

    def no_node(command, *args, **kwargs):
        raise ValueError(f"{command} not found")  # as jupyterlab's `which` says it

    monkeypatch.setattr(jupyterlab.commands, "which", no_node)  # upstream's own answer without Node, nothing run
    assert original(logging.getLogger("test")) == upstream.no_yarn_config(None)
    upstream.skip_yarn_config()
    assert jupyterlab.commands._yarn_config is upstream.no_yarn_config
    monkeypatch.setattr(jupyterlab.commands, "_yarn_config", original)


# --- jupyter_server, the standard library, jupyter-server-proxy -------------------------------------------------
def test_git_probe_answer_is_jupyter_servers_own_outside_a_repository(monkeypatch, tmp_path):
    original = _sysinfo.pkg_commit_hash
    assert list(inspect.signature(original).parameters) == ["pkg_path"]
    assert "pkg_commit_hash(pkg_path)" in inspect.getsource(_sysinfo.pkg_info)  # (looked up at each call)
    assert original(str(tmp_path)) == upstream.no_commit_hash(str(tmp_path))  # upstream's own answer, no .git above
    monkeypatch.setattr(_sysinfo, "pkg_commit_hash", original)  # (put back after the test)
    monkeypatch.setattr(platform, "platform", lambda: "Linux")  # (its own fence: test_platform_found_once)
    upstream.skip_git_probe()
    # From this checkout's venv: without the cut, `git rev-parse` would run (a process: the unit lane's conftest fails)
    info = _sysinfo.get_sys_info()
    assert (info["commit_source"], info["commit_hash"]) == ("", "")


def test_platform_found_once(monkeypatch):
    """cache_platform's premises: jupyter_server's sysinfo asks platform.platform() at each start, whose first answer
    runs `uname -p` and reads the C library's version, and Python keeps that answer."""
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == upstream.PYTHON, (
        f"Python {sys.version.split()[0]} runs; upstream.cache_platform was checked against {upstream.PYTHON}"
    )
    assert "platform.platform()" in inspect.getsource(_sysinfo.pkg_info)
    found: list[str] = []
    monkeypatch.setattr(platform, "_platform_cache", {})  # (as in a new fork server; put back after the test)
    monkeypatch.setattr(platform, "_uname_cache", None)
    monkeypatch.setattr(platform._Processor, "from_subprocess", lambda: found.append("uname -p") or "x86_64")
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **kw: found.append("libc") or ("glibc", "2.36"))
    monkeypatch.setattr(_sysinfo, "pkg_commit_hash", upstream.no_commit_hash)
    upstream.cache_platform()
    assert found == ["uname -p", "libc"]
    assert _sysinfo.get_sys_info()["platform"].endswith("-x86_64-with-glibc2.36")
    assert found == ["uname -p", "libc"]  # not found again


def test_server_proxy_named_servers_found_from_one_reading(monkeypatch):
    """jupyter-server-proxy finds its named servers through the entry_points its config module imported, asked for
    upstream.SERVER_PROXY_GROUP; once snapshot, it finds the project's without reading the installed packages."""
    assert f'entry_points(group="{upstream.SERVER_PROXY_GROUP}")' in inspect.getsource(
        server_proxy_config.get_entrypoint_server_processes
    )
    assert server_proxy_config.entry_points is importlib.metadata.entry_points
    expected = importlib.metadata.entry_points(group=upstream.SERVER_PROXY_GROUP)
    assert {"batch-jobs", "nrp"} <= set(expected.names)  # the project's named servers (hub and extension packages)
    monkeypatch.setattr(server_proxy_config, "entry_points", server_proxy_config.entry_points)  # (put back after)
    upstream.snapshot_server_proxy_entry_points()

    def no_reading():
        raise AssertionError("the installed packages were read again")

    monkeypatch.setattr(importlib.metadata, "distributions", no_reading)
    found = [process.name for process in server_proxy_config.get_entrypoint_server_processes()]
    assert found == [entry_point.name for entry_point in expected]
    answer = server_proxy_config.entry_points(group=upstream.SERVER_PROXY_GROUP)
    assert (
        tuple(answer) == tuple(expected)
        and server_proxy_config.entry_points(group=upstream.SERVER_PROXY_GROUP) is answer
    )
    with pytest.raises(AssertionError, match="read again"):  # any other question is importlib's, asked anew
        server_proxy_config.entry_points(group="console_scripts")


def test_home_volume_named_with_the_configured_escape(write_config):
    """`volumes remove NAME` finds the volume the hub's spawner made: by default DockerSpawner's escaping, and an
    operator's `escape` from jupyterhub_config.d when set (it used to be ignored)."""
    path = write_config({"spawner": {"type": "docker", "docker": {"volume_prefix": "home-"}}})
    d = load([path])
    assert dockermod.home_volume_name(d, "a.b") == "home-a-2eb"
    (path.parent / "jupyterhub_config.d").mkdir(mode=0o755)
    (path.parent / "jupyterhub_config.d" / "escape.py").write_text("c.DockerSpawner.escape = 'legacy'\n")
    assert dockermod.home_volume_name(d, "a.b") == "home-a_2Eb"


# --- the extension's tornado fence ----------------------------------------------------------------------------
class _Upstream(web.RequestHandler):
    pass


class _Guard(web.RequestHandler):
    pass


def _request(path: str, connection=None):
    return httputil.HTTPServerRequest(
        start_line=httputil.RequestStartLine("GET", path, "HTTP/1.1"),
        headers=httputil.HTTPHeaders({"Host": "127.0.0.1"}),
        connection=connection or mock.Mock(),
    )


def test_first_rules_come_before_every_other_route():
    app = web.Application([(r"/proxy/.*", _Upstream)])
    app.add_handlers(".*", [(r"/proxy/9000/.*", _Upstream)])  # as jupyter-server-proxy adds its routes
    proxy_upstream.insert_first_rules(app, [Rule(PathMatches(r"/proxy/9000/.*"), _Guard)])
    assert app.find_handler(_request("/proxy/9000/x")).handler_class is _Guard
    assert app.find_handler(_request("/proxy/8000/x")).handler_class is _Upstream


def test_finished():
    async def run():
        connection = mock.Mock()
        connection.write_headers.return_value = asyncio.get_running_loop().create_future()
        connection.write_headers.return_value.set_result(None)
        handler = web.RequestHandler(web.Application(), _request("/x", connection))
        handler._transforms = []  # (set by tornado when it runs a request)
        before = proxy_upstream.finished(handler)
        handler.redirect("/login")
        return before, proxy_upstream.finished(handler)

    assert asyncio.run(run()) == (False, True)


def test_status_reason():
    """The phrase an error body of the job service names (tornado's private RequestHandler._reason)."""

    async def run():
        handler = web.RequestHandler(web.Application(), _request("/x"))
        handler.set_status(404)
        plain = upstream.status_reason(handler)
        handler.set_status(400, reason="Bad job file")
        return plain, upstream.status_reason(handler)

    assert asyncio.run(run()) == ("Not Found", "Bad job file")
