"""The fork server's request (encoding and every refusal), its environment guard, the per-user state its children
refresh, and the fence around LocalProcessSpawner.start()'s Popen arguments (fork_server.popen_arguments)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import struct
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
from jupyterhub import auth, orm  # noqa: F401 (auth: its import runs ldconfig, for pamela: at collection)
from jupyterhub.objects import Hub
from jupyterhub.spawner import LocalProcessSpawner

from spinnaker_jupyter import fork_server as fs
from spinnaker_jupyter import upstream

SCRIPT = "/opt/venv/bin/jupyterhub-singleuser"


def _request(**changes) -> fs.Request:
    fields = dict(
        argv=[*fs.launcher_argv(), SCRIPT, "--port=1234"],
        env={"JUPYTERHUB_API_TOKEN": "t", "PATH": "/usr/bin"},
        cwd="/srv/homes/alice",
        log="/srv/logs/alice.log",
        cgroup_dirs=["/sys/fs/cgroup/x/alice"],
        mem=700 << 20,
        cpu=0.5,
        tasks=64,
        own_account=True,
        uid=70001,
        gid=70001,
        groups=[70001],
    )
    return fs.Request(**{**fields, **changes})


def test_a_request_round_trips():
    req = _request()
    data = req.encode()
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4
    assert fs.Request.decode(data[4:]) == req
    hubs_own = _request(uid=None, gid=None, groups=[], cgroup_dirs=[], mem=None, cpu=None, tasks=None)
    assert fs.Request.decode(hubs_own.encode()[4:]) == hubs_own


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"argv": ["/usr/bin/python3", "-c", "print(1)", SCRIPT]}, "argv must be"),
        ({"argv": fs.launcher_argv()}, "argv must be"),
        ({"argv": [*fs.launcher_argv(), "jupyterhub-singleuser"]}, "argv must be"),
        ({"argv": [*fs.launcher_argv(), SCRIPT, 3]}, "argv must be"),
        ({"env": {"A": 1}}, "env must map"),
        ({"env": {"A=B": "c"}}, "env has"),
        ({"env": {"A": "x\0y"}}, "env must map"),
        ({"cwd": "homes/alice"}, "cwd must be an absolute path"),
        ({"log": None}, "log must be an absolute path"),
        ({"cgroup_dirs": ["relative"]}, "cgroup_dirs"),
        ({"mem": -1}, "mem must be"),
        ({"tasks": True}, "tasks must be"),
        ({"cpu": "1"}, "cpu must be"),
        ({"own_account": 1}, "own_account"),
        ({"uid": 0}, "uid not 0"),
        ({"uid": 5, "gid": None}, "uid and gid"),
        ({"uid": -5}, "uid and gid"),
        ({"groups": [0, "wheel"]}, "groups"),
    ],
)
def test_a_bad_request_is_refused_saying_what(changes, words):
    body = json.dumps({**json.loads(_request().encode()[4:]), **changes}).encode()
    with pytest.raises(ValueError, match=words):
        fs.Request.decode(body)


def test_a_request_with_other_keys_or_not_json_is_refused():
    good = json.loads(_request().encode()[4:])
    with pytest.raises(ValueError, match="exactly the keys"):
        fs.Request.decode(json.dumps({**good, "preexec": "os.system('x')"}).encode())
    with pytest.raises(ValueError, match="exactly the keys"):
        fs.Request.decode(json.dumps({k: v for k, v in good.items() if k != "uid"}).encode())
    with pytest.raises(ValueError, match="not JSON"):
        fs.Request.decode(b"\xff{")


def test_the_environment_guard_names_what_differs(monkeypatch):
    monkeypatch.setenv("LANG", "C.UTF-8")
    for name in [k for k in os.environ if k.startswith("PYTHON") or k in fs.STARTUP_ENV]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LANG", "C.UTF-8")
    read = {"AIOHTTP_NO_EXTENSIONS": None, "JUPYTERHUB_METRICS_PREFIX": None}
    same = {"LANG": "C.UTF-8", "JUPYTERHUB_API_TOKEN": "mine", "HOME": "/h/a"}
    assert fs.differences(same, read) == []  # per-user values nobody read at import
    assert fs.differences({**same, "AIOHTTP_NO_EXTENSIONS": "1"}, read) == ["AIOHTTP_NO_EXTENSIONS"]
    assert fs.differences({**same, "PYTHONPATH": "/x"}, read) == ["PYTHONPATH"]  # read by the interpreter
    assert fs.differences({"JUPYTERHUB_API_TOKEN": "mine"}, read) == ["LANG"]


def test_a_server_gets_the_locale_coercion_its_own_interpreter_would_make(monkeypatch):
    monkeypatch.setenv("LC_CTYPE", "C.UTF-8")  # (as PEP 538 sets it in an interpreter started without a locale)
    env = {"PATH": "/usr/bin", "JUPYTERHUB_USER": "alice"}
    assert fs.as_started(env, {"PATH": "/usr/bin"}) == {**env, "LC_CTYPE": "C.UTF-8"}
    assert fs.as_started(env, {"PATH": "/usr/bin", "LC_CTYPE": "C.UTF-8"}) == env  # set, not coerced
    assert fs.as_started({**env, "LANG": "de_DE.UTF-8"}, {"PATH": "/usr/bin"})["LANG"] == "de_DE.UTF-8"
    assert "LC_CTYPE" not in fs.as_started({**env, "LANG": "de_DE.UTF-8"}, {"PATH": "/usr/bin"})


def _in_module(name: str, code: str) -> None:
    exec(code, {"__name__": name})


def test_environment_reads_at_import_are_recorded_except_the_handled_modules(monkeypatch):
    monkeypatch.setenv("FZ_SHARED", "1")
    monkeypatch.setenv("FZ_TRASH", "/root/.local/share")

    def imports():
        _in_module("some.module", "import os\nos.environ.get('FZ_SHARED')\nos.getenv('FZ_ABSENT')")
        _in_module("send2trash.plat_other", "import os\nos.environ.get('FZ_TRASH')")
        _in_module("wsgiref.handlers", "import os\ndict(os.environ.items())")

    assert fs._record_environment_reads(imports) == {"FZ_SHARED": "1", "FZ_ABSENT": None}
    everything = fs._record_environment_reads(lambda: _in_module("other.module", "import os\nlist(os.environ)"))
    assert everything["FZ_SHARED"] == "1" and "FZ_TRASH" in everything  # an unknown whole-environment copy
    assert type(os.environ).__getitem__.__qualname__ == "_Environ.__getitem__"  # (put back)


def test_state_taken_at_import_follows_the_servers_user(monkeypatch, tmp_path):
    import send2trash.plat_other as trash
    from jupyter_client.session import Session

    before = Session.username.default_value
    monkeypatch.setenv("USER", "jupyter-alice")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    try:
        fs._refresh_per_user_state("/srv/homes/alice")
        assert Session().username == "jupyter-alice"
        assert sys.modules["multiprocessing.process"].ORIGINAL_DIR == "/srv/homes/alice"
        assert trash.HOMETRASH == str(tmp_path / ".local" / "share" / "Trash") and trash.uid == os.getuid()
    finally:
        monkeypatch.undo()
        importlib.reload(trash)
        Session.username.default_value = before
        Session._static_immutable_initial_values["username"] = before
        import multiprocessing.process

        multiprocessing.process.ORIGINAL_DIR = os.getcwd()


def test_the_zygote_finds_the_machine_wide_answers_after_its_imports(monkeypatch):
    """preload() takes upstream's fenced snapshots (each checked in test_upstream.py) once its recorded imports ran."""
    calls = []
    monkeypatch.setattr(fs, "_record_environment_reads", lambda imports: calls.append("imports") or {"HOME": None})
    monkeypatch.setattr(upstream, "cache_platform", lambda: calls.append("platform"))
    monkeypatch.setattr(upstream, "snapshot_server_proxy_entry_points", lambda: calls.append("entry points"))
    assert fs.preload() == {"HOME": None}
    assert calls == ["imports", "platform", "entry points"]


def test_a_folder_others_could_enter_is_refused(tmp_path):
    folder = tmp_path / "fork-server"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    with pytest.raises(fs.ForkServerError, match="mode 0700"):
        fs.own_folder(folder)
    os.chmod(folder, 0o700)
    fs.own_folder(folder)


# --- the fence: what LocalProcessSpawner.start() gives Popen (jupyterhub 6.1.1) -----------------------------------
class _NoSwitch(LocalProcessSpawner):
    def make_preexec_fn(self, name):
        return None


@pytest.fixture
def spawner(tmp_path):
    db = orm.new_session_factory(f"sqlite:///{tmp_path}/jupyterhub.sqlite")()
    alice = orm.User(name="alice")
    db.add(alice)
    db.commit()
    orm_spawner = orm.Spawner(user=alice, name="")
    db.add(orm_spawner)
    db.commit()
    user = SimpleNamespace(name="alice", url="/user/alice/")
    s = _NoSwitch(user=user, orm_spawner=orm_spawner, hub=Hub())
    s.cmd = [*fs.launcher_argv(), SCRIPT]
    s.args = ["--allow-root"]
    s.api_token = "secret-token"
    s.user_env = lambda env: {**env, "HOME": "/srv/homes/alice"}
    yield s
    db.close()


def test_popen_arguments_are_what_start_gives_popen(spawner):
    given = {}

    class Popen(subprocess.Popen):
        def __init__(self, cmd, **kwargs):  # (starts nothing)
            given.update(cmd=cmd, env=kwargs["env"])
            self.pid = 4242

        def __del__(self):
            pass

    with mock.patch("jupyterhub.spawner.Popen", Popen):
        asyncio.run(spawner.start())
    port = spawner.port
    cmd, env = fs.popen_arguments(spawner)
    assert spawner.port == port and (cmd, env) == (given["cmd"], given["env"])
    assert env["JUPYTERHUB_API_TOKEN"] == "secret-token" and cmd[-1] == "--allow-root"


def test_popen_arguments_choose_a_port_and_refuse_other_commands(spawner):
    spawner.port = 0
    fs.popen_arguments(spawner)
    assert spawner.port
    spawner.cmd = ["jupyterhub-singleuser"]
    with pytest.raises(fs.ForkServerError, match="command is not"):
        fs.popen_arguments(spawner)
    spawner.cmd, spawner.shell_cmd = [*fs.launcher_argv(), SCRIPT], ["bash", "-c"]
    with pytest.raises(fs.ForkServerError, match="shell_cmd"):
        fs.popen_arguments(spawner)
